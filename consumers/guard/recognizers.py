"""Pattern recognizers: PII and secrets, and a tenant's deny lists.

Presidio's pattern recognizers were the first choice; `presidio-analyzer` imports
spaCy (and wants a spaCy model, which is fetched from a hub) before any recognizer
can run, so these are written here, after Presidio's patterns and checks (Luhn for
card numbers, ISO 13616 mod 97 for IBANs, a digit count for phone numbers).

Every pattern is matched with `regex`'s partial matching, so that a recognizer
also says where text at the end of a growing stream *could still become* a match
(``john.smith@exa``, ``4111 1111``): the guard holds that back (see judge.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import regex

from .policies import TenantPolicy


@dataclass(frozen=True, slots=True)
class Recognizer:
    category: str  # email, phone, card, iban, api_key, deny
    policy: str  # the rule's name in the tenant's policy
    pattern: regex.Pattern[str]
    valid: Callable[[str], bool] = lambda _: True


@dataclass(frozen=True, slots=True)
class Found:
    recognizer: Recognizer
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Scan:
    found: list[Found]  # complete, valid matches
    open_from: int  # text from here on could still grow into a match; len(text) if none


def luhn(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, digit in enumerate(reversed(digits)):
        if i % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def iban(text: str) -> bool:
    compact = "".join(text.split()).upper()
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in moved))
    except ValueError:
        return False
    return number % 97 == 1


def phone(text: str) -> bool:
    return 9 <= sum(c.isdigit() for c in text) <= 15


_PII: dict[str, tuple[str, Callable[[str], bool]]] = {
    "email": (
        r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
        r"(?![A-Za-z0-9-])",
        lambda _: True,
    ),
    "card": (r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])", luhn),
    "iban": (r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])", iban),
    "phone": (
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}"
        r"(?![\w])",
        phone,
    ),
    "api_key": (
        r"(?<![\w-])(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36}"
        r"|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}"
        r"|(?i:api[_-]?key|secret|token)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_\-/+]{16,})"
        r"(?![\w-])",
        lambda _: True,
    ),
}


def recognizers_for(policy: TenantPolicy) -> list[Recognizer]:
    found = [
        Recognizer(kind, f"pii.{kind}", regex.compile(_PII[kind][0]), _PII[kind][1])
        for kind in policy.pii
    ]
    if policy.deny:
        words = "|".join(regex.escape(word) for word in sorted(policy.deny, key=len, reverse=True))
        found.append(
            Recognizer("deny", "deny", regex.compile(rf"(?i)(?<!\w)(?:{words})(?!\w)"))
        )  # fmt: skip
    for i, pattern in enumerate(policy.deny_patterns):
        found.append(Recognizer("deny", f"deny_patterns[{i}]", regex.compile(pattern)))
    return found


def scan(recognizers: Iterable[Recognizer], text: str, start: int, *, final: bool) -> Scan:
    """Matches in ``text[start:]``. Unless ``final``, a match that reaches the end of
    the text is not reported yet (it could grow: ``a@b.co`` into ``a@b.com``); it
    and any partial match hold back ``open_from``."""
    found = []
    open_from = len(text)
    for recognizer in recognizers:
        for match in recognizer.pattern.finditer(text, pos=start, partial=not final):
            begin, end = match.span()
            if end == begin:
                continue
            if not final and (match.partial or end == len(text)):
                open_from = min(open_from, begin)
                continue
            if recognizer.valid(match.group()):
                found.append(Found(recognizer, begin, end))
    return Scan(found, open_from)
