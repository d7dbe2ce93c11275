"""Child processes (the embedded broker, `up`'s worker) that never outlive their parent."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A ``preexec_fn``: the kernel sends the child SIGTERM when its parent dies, even
    by SIGKILL, so a killed `tokenbus up` leaves no broker or worker behind. Linux only;
    elsewhere the parent's own shutdown path is all there is."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
