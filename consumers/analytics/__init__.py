"""The analytics consumer (``tokenbus analytics``): latency and throughput of the
token stream, per request and in one-minute windows per model and per tenant.

See `app` for the Faust app and why it departs from Faust's defaults, `timings`
for what each figure measures.
"""

from .app import Analytics
from .timings import RequestSummary, RequestTimings
from .windows import Distribution, WindowStats

__all__ = ["Analytics", "Distribution", "RequestSummary", "RequestTimings", "WindowStats"]
