import threading

import pytest

from fdrl import file_lock


def test_a_second_holder_fails_with_the_first_ones_note_until_it_lets_go(tmp_path):
    path = str(tmp_path / "x.lock")
    with file_lock.exclusive(path, wait=False, note="pid 1 on host"):
        with pytest.raises(file_lock.LockedError, match="pid 1 on host"):
            with file_lock.exclusive(path, wait=False):
                pass
    with file_lock.exclusive(path, wait=False, note="pid 2 on host"):  # released: free again
        pass
    assert open(path).read() == "pid 2 on host"


def test_a_waiting_holder_enters_after_the_first_leaves(tmp_path):
    path, order, entered = str(tmp_path / "x.lock"), [], threading.Event()

    def second():
        entered.set()
        with file_lock.exclusive(path):
            order.append("second")

    with file_lock.exclusive(path):
        thread = threading.Thread(target=second)
        thread.start()
        entered.wait(10)
        thread.join(0.5)  # it cannot get in while the first holds the lock
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]


def test_the_block_raising_releases_the_lock(tmp_path):
    path = str(tmp_path / "x.lock")
    with pytest.raises(KeyError):
        with file_lock.exclusive(path, wait=False):
            raise KeyError("inside")
    with file_lock.exclusive(path, wait=False):
        pass
