"""Fixtures of the in-process unit tests (the modules `make mutation` mutates)."""

import signal

import pytest


@pytest.fixture(autouse=True)
def a_sighup_fails_the_test():
    """Nothing here may signal this process: ``fileio.pid_alive`` asks with signal 0 about pids that
    include its own (a live writer's temp files). A real signal would hang the test process up, so
    mutmut could not tell that apart from a crash; raised here, CPython delivers it before
    ``os.kill`` returns, it fails the test that sent it."""

    def fail(signum, frame):
        raise AssertionError("the test process received SIGHUP")

    previous = signal.signal(signal.SIGHUP, fail)
    yield
    signal.signal(signal.SIGHUP, previous)
