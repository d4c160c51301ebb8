"""A worker's signals: SIGUSR1 writes every thread's stack (service.runtime.dump_stacks_on)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from service.runtime import STACK_DUMP_SIGNAL, dump_stacks_on

_CHILD = """
import sys, time
from service.runtime import STACK_DUMP_SIGNAL, dump_stacks_on
assert dump_stacks_on(STACK_DUMP_SIGNAL)
print("ready", flush=True)
def waiting_in_a_recognisable_frame():
    time.sleep(30)
waiting_in_a_recognisable_frame()
"""


def test_sigusr1_dumps_every_threads_stack_and_the_process_keeps_running():
    assert STACK_DUMP_SIGNAL == signal.SIGUSR1
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert proc.poll() is None  # a dump, not a stop
    finally:
        proc.kill()
        _out, err = proc.communicate(timeout=10)
    assert "waiting_in_a_recognisable_frame" in err and "thread 0x" in err, err


def test_dump_stacks_on_reports_when_it_cannot_register(monkeypatch):
    import faulthandler
    import io

    def refuse(*_a, **_k):
        raise io.UnsupportedOperation("stderr has no fileno")

    monkeypatch.setattr(faulthandler, "register", refuse)
    assert dump_stacks_on(STACK_DUMP_SIGNAL) is False
