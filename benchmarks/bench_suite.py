"""The suite the benchmark runs through pytest: each test dirties disk and RAM.

Each test checks that the previous test's markers are gone (unless the run
uses ``--kvm-revert=never``, whose time is the baseline that gets subtracted).
"""

import os

import pytest

from pytest_kvmsnap.testing import Console
from pytest_kvmsnap.testing.guest import guest_dir

N = int(os.environ.get("KVMSNAP_BENCH_TESTS", "10"))
EXPECT_CLEAN = os.environ.get("KVMSNAP_BENCH_EXPECT_CLEAN", "1") == "1"


@pytest.mark.kvm_snapshot
@pytest.mark.parametrize("i", range(N))
def test_dirty(i, kvm_guest):
    sh = Console(str(guest_dir() / "sock" / f"{kvm_guest.name}.sock"))
    sh.wait_ready()
    leftover = sh.run("cat /data/marker /tmp/marker 2>/dev/null").output
    if EXPECT_CLEAN:
        assert leftover == "", f"test {i} found {leftover!r}"
    sh.check(f"echo {i} > /data/marker; echo {i} > /tmp/marker")
