"""The guard's policies: a TOML file, one table per tenant over a ``[default]``.

    [default]                 # every tenant, unless its own table says otherwise
    version = "2026-12-01"    # goes on every violation: which rules judged it
    mode = "monitor"          # the tenant's default moderation mode: off, monitor, strict
    pii = ["email", "phone", "card", "iban", "api_key"]
    deny = ["zorblax"]        # words and phrases, matched whole, case-insensitive
    deny_patterns = ['(?i)project\\s+nightshade']   # regular expressions (`regex` syntax)
    topics = ["instructions for building weapons"]  # the semantic check: forbidden topics
    topic_threshold = 0.6     # cosine similarity of a sentence to a topic that flags it

    [tenants.acme]
    version = "7"
    mode = "strict"
    deny = ["zorblax", "frobnicate"]

A tenant's table replaces each key it gives and inherits the others. Without a
file, every tenant gets `DEFAULT_POLICY`: PII and secrets, nothing else, mode off.

This module is pure (no model, no Kafka): the HTTP edge reads the same file for
each tenant's default mode.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas import ModerationMode

PiiKind = Literal["email", "phone", "card", "iban", "api_key"]
ALL_PII: tuple[PiiKind, ...] = ("email", "phone", "card", "iban", "api_key")


class PolicyError(ValueError):
    """The policy file cannot be used; the message says where and why."""


class TenantPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Annotated[str, Field(min_length=1, max_length=64)] = "builtin-1"
    mode: ModerationMode = ModerationMode.OFF
    pii: tuple[PiiKind, ...] = ALL_PII
    deny: tuple[Annotated[str, Field(min_length=1, max_length=256)], ...] = ()
    deny_patterns: tuple[str, ...] = ()
    topics: tuple[Annotated[str, Field(min_length=1, max_length=512)], ...] = ()
    topic_threshold: float = Field(default=0.6, gt=0.0, le=1.0)

    @field_validator("deny_patterns")
    @classmethod
    def _compiles(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                regex.compile(pattern)
            except regex.error as exc:
                raise ValueError(f"deny pattern {pattern!r} does not compile: {exc}") from None
        return patterns


DEFAULT_POLICY = TenantPolicy()


class Policies:
    """Every tenant's policy, from one file (or the built-in default)."""

    def __init__(self, default: TenantPolicy, tenants: dict[str, TenantPolicy]) -> None:
        self.default = default
        self._tenants = tenants

    @classmethod
    def builtin(cls) -> Policies:
        return cls(DEFAULT_POLICY, {})

    @classmethod
    def load(cls, path: Path | None) -> Policies:
        if path is None:
            return cls.builtin()
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise PolicyError(f"cannot read the policy file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{path} is not valid TOML: {exc}") from None
        return cls.parse(raw, source=str(path))

    @classmethod
    def parse(cls, raw: dict[str, object], *, source: str = "policies") -> Policies:
        unknown = set(raw) - {"default", "tenants"}
        if unknown:
            raise PolicyError(f"{source}: unknown tables {sorted(unknown)}; say [default] "
                              "or [tenants.NAME]")  # fmt: skip
        base = raw.get("default", {})
        tenants = raw.get("tenants", {})
        if not isinstance(base, dict) or not isinstance(tenants, dict):
            raise PolicyError(f"{source}: [default] and [tenants.NAME] must be tables")
        default = _policy(base, f"{source} [default]")
        merged = {}
        for tenant, table in tenants.items():
            if not isinstance(table, dict):
                raise PolicyError(f"{source}: [tenants.{tenant}] must be a table")
            merged[tenant] = _policy(base | table, f"{source} [tenants.{tenant}]")
        return cls(default, merged)

    def for_tenant(self, tenant: str | None) -> TenantPolicy:
        return self._tenants.get(tenant or "", self.default)

    def mode_for(self, tenant: str) -> ModerationMode:
        return self.for_tenant(tenant).mode

    @property
    def any_topics(self) -> bool:
        return bool(self.default.topics) or any(p.topics for p in self._tenants.values())


def _policy(table: dict[str, object], where: str) -> TenantPolicy:
    try:
        return TenantPolicy.model_validate(table)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise PolicyError(f"{where} {field}: {first['msg']}") from None
