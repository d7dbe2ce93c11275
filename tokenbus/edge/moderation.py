"""Each submission's moderation mode: the client's choice, else its tenant's default.

The defaults come from the guard's policy file (``TOKENBUS_GUARD_POLICIES``, each
tenant's ``mode``), read once when the app is built, so a broken file fails the
start, not a request; without a file, ``TOKENBUS_MODERATION_DEFAULT`` for all.
The mode is resolved here, at submission, and travels on the request: the worker,
the guard and a strict relay all read the same value from the bus.
"""

from __future__ import annotations

from consumers.guard.policies import Policies
from schemas import GenerationRequest, ModerationMode
from tokenbus.bus.settings import ServerSettings


class ModerationDefaults:
    def __init__(self, settings: ServerSettings) -> None:
        self._policies = (
            Policies.load(settings.guard_policies) if settings.guard_policies is not None else None
        )
        self._default = ModerationMode(settings.moderation_default)

    def mode_for(self, tenant: str) -> ModerationMode:
        if self._policies is None:
            return self._default
        return self._policies.mode_for(tenant)

    def resolve(self, generation: GenerationRequest) -> GenerationRequest:
        if generation.moderation is not None:
            return generation
        return generation.model_copy(update={"moderation": self.mode_for(generation.tenant)})
