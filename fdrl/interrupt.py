"""Stopping a training loop between steps on SIGINT or SIGTERM, so that it saves first.

Ctrl-C, a scheduler's SIGTERM, or a notebook's "interrupt" would otherwise land mid-step
and lose every step since the last checkpoint (and a step that donates its input state
leaves nothing consistent to save). Inside `StopRequest`, these signals are only noted;
the loop asks `requested` after each step, saves, and raises `exit_exception`.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional


class StopRequest:
    """While entered (and `enabled`), SIGINT and SIGTERM set `signum` instead of interrupting.

    A second SIGINT interrupts at once (KeyboardInterrupt), for when the step will not end.
    Off the main thread, where Python cannot catch signals, it changes nothing. The handlers
    it replaced are back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _note(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt("a second SIGINT: stopping without waiting for the step")
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exit_exception(self, message: str) -> BaseException:
        """What to raise once saved: KeyboardInterrupt for SIGINT (as Ctrl-C would, and what a
        notebook's interrupt expects), SystemExit otherwise (a scheduler's SIGTERM)."""
        name = signal.Signals(self.signum).name if self.signum is not None else "a stop request"
        message = f"{name}: {message}"
        return KeyboardInterrupt(message) if self.signum == signal.SIGINT else SystemExit(message)
