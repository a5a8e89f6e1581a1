"""Output files written on a background thread: in order, every one of them, and no error lost."""

from __future__ import annotations

import threading
import time

import pytest
from steprl.background_writes import BackgroundWrites


def test_writes_run_in_order_on_another_thread_and_all_finish(tmp_path):
    done, threads = [], set()

    def write(k):
        time.sleep(0.01)
        threads.add(threading.get_ident())
        (tmp_path / f"{k}.txt").write_text(str(k))
        done.append(k)

    with BackgroundWrites(max_pending=2) as writes:
        for k in range(6):
            writes.submit(write, k)
    assert done == list(range(6)) and threading.get_ident() not in threads
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{k}.txt" for k in range(6)]


def test_a_failed_write_is_raised(tmp_path):
    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWrites(max_pending=1) as writes:
            writes.submit(fail)
            writes.submit(lambda: None)  # waits for the failed one and raises its error here


def test_the_callers_error_wins_and_later_writes_are_dropped(tmp_path):
    started = []
    with pytest.raises(KeyError):
        with BackgroundWrites(max_pending=3) as writes:
            writes.submit(time.sleep, 0.05)
            writes.submit(started.append, 1)
            raise KeyError("the registration failed")
    assert len(started) <= 1  # cancelled if it had not started; never a second error


def test_submit_outside_the_block_is_refused():
    with pytest.raises(RuntimeError, match="outside"):
        BackgroundWrites().submit(print)
