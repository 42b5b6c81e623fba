"""Timings for the layers benchmark that the plugin's summary does not give (JSON lines in
``KVMSNAP_BENCH_TIMES``): the session fixture's setup, when it was torn down, when each test
finished, so the layer's end (the revert down to the baseline and the layer's deletion, in the
last test's teardown) can be timed, and when each test body began.  Loaded with ``-p layers_timing``."""

import json
import os
import time

TIMES = os.environ.get("KVMSNAP_BENCH_TIMES", "")


def note(**figures: float) -> None:
    if TIMES:
        with open(TIMES, "a") as out:
            out.write(json.dumps(figures) + "\n")


def pytest_runtest_logfinish(nodeid: str, location: object) -> None:
    note(test_finished=time.perf_counter())


def pytest_runtest_call(item: object) -> None:
    note(test_called=time.perf_counter())  # perf_counter is CLOCK_MONOTONIC: the benchmark compares it with its own
