"""Child processes (the embedded broker, `up`'s worker) that never outlive their parent."""

from __future__ import annotations

import ctypes
import os
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


def supervised() -> None:
    """A ``preexec_fn`` for a child its parent stops: it dies with its parent, and
    it has a process group of its own, so a Ctrl-C at the terminal (SIGINT to the
    foreground group) reaches the parent alone, which then stops its children in
    order: the broker's clients first, the broker last. Had the broker the signal
    too, it would be gone while its clients shut down, and each would say so."""
    die_with_parent()
    os.setpgid(0, 0)
