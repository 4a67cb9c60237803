"""Ctrl-C during training: a first one is deferred to the end of the current step, so the run
saves a consistent checkpoint and stops (``--resume`` goes on); a second one aborts at once,
without saving."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

__all__ = ["DeferredInterrupt"]


class DeferredInterrupt:
    """Within its ``with`` block, SIGINT sets :attr:`requested` instead of raising, and a second
    one raises :class:`KeyboardInterrupt`. Only for a single process in the main thread
    (``enabled``): under DDP every rank would have to agree on the step, so there an interrupt
    just stops."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> DeferredInterrupt:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step and saving (Ctrl-C again to abort without saving)", file=sys.stderr)
