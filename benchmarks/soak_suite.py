"""The suite benchmarks/soak.py runs: each test checks it starts clean, then dirties the
guest's disk (64 KiB of fresh random data, one qcow2 cluster, synced) and RAM (4 MiB of
fresh random data on tmpfs).

Sizes and tools chosen for TCG right after a revert, measured: busybox ``head -c`` from
/dev/urandom takes 1.2 s for 64 KiB there, ``dd`` 0.03 s; 256 KiB to the disk with
fsync 1.1 s (four cluster allocations), 64 KiB 0.03 s."""

import os

import pytest

from pytest_kvmsnap.testing import Console
from pytest_kvmsnap.testing.guest import guest_dir

GUEST = os.environ.get("KVMSNAP_SOAK_GUEST", "kvmsnap-soak")
N = int(os.environ.get("KVMSNAP_SOAK_TESTS", "1000"))


@pytest.fixture(scope="session")
def sh() -> Console:
    return Console(str(guest_dir() / "sock" / f"{GUEST}.sock"))


@pytest.mark.kvm_snapshot(GUEST)
@pytest.mark.parametrize("i", range(N))
def test_dirty(i: int, sh: Console) -> None:
    assert sh.run("! ls /data/marker /tmp/marker 2>/dev/null").status == 0, f"test {i} found a leftover"
    sh.check("dd if=/dev/urandom of=/data/marker bs=64k count=1 conv=fsync 2>/dev/null && "
             "dd if=/dev/urandom of=/tmp/marker bs=1M count=4 2>/dev/null")
