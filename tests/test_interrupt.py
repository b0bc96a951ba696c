import os
import signal
import threading

import pytest

from fdrl import interrupt


def test_signals_are_noted_not_raised_and_the_old_handlers_come_back():
    before = {s: signal.getsignal(s) for s in interrupt.StopRequest.SIGNALS}
    with interrupt.StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process without the handler
        assert stop.requested and stop.signum == signal.SIGTERM
        exc = stop.exit_exception("saved")
        assert isinstance(exc, SystemExit) and str(exc) == "SIGTERM: saved"
    assert {s: signal.getsignal(s) for s in interrupt.StopRequest.SIGNALS} == before


def test_ctrl_c_is_noted_once_and_a_second_one_interrupts():
    with interrupt.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        assert isinstance(stop.exit_exception("x"), KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)


def test_disabled_or_off_the_main_thread_it_changes_nothing():
    handler = signal.getsignal(signal.SIGINT)
    with interrupt.StopRequest(enabled=False) as stop:
        assert signal.getsignal(signal.SIGINT) is handler and not stop.enabled
    seen = []
    thread = threading.Thread(target=lambda: seen.append(interrupt.StopRequest().enabled))
    thread.start()
    thread.join()
    assert seen == [False]
