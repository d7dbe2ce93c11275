"""The guard: streaming guardrails as one more reader of the log (see docs/guard.md).

It reads ``tokenbus.tokens``, judges each moderated stream's text against its
tenant's policies (PII and secrets, deny lists and patterns, forbidden topics) and
publishes verdicts, a watermark and violations, to ``tokenbus.verdicts``."""

from .guard import Guard
from .judge import StreamJudge
from .metrics import GuardMetrics
from .policies import DEFAULT_POLICY, Policies, PolicyError, TenantPolicy
from .recognizers import Recognizer, recognizers_for, scan

__all__ = [
    "DEFAULT_POLICY",
    "Guard",
    "GuardMetrics",
    "Policies",
    "PolicyError",
    "Recognizer",
    "StreamJudge",
    "TenantPolicy",
    "recognizers_for",
    "scan",
]
