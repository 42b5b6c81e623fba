"""The suite the benchmark runs through pytest: each test dirties disk and RAM.

Each test checks that the previous test's markers are gone (unless nothing
reverts between tests: ``--kvm-revert=never`` or the hand-written ``none``,
whose times are the baselines that get subtracted).

``KVMSNAP_BENCH_HANDWRITTEN`` runs it without the plugin (``-p no:kvmsnap``)
and with what a hand-written conftest does instead: one snapshot at session
start, ``revertToSnapshot`` (or an in-place ``loadvm``, or nothing) after each
test, and a revert plus delete at session end.
"""

import json
import os
from pathlib import Path

import pytest

from pytest_kvmsnap.testing import Console
from pytest_kvmsnap.testing.guest import guest_dir

N = int(os.environ.get("KVMSNAP_BENCH_TESTS", "10"))
EXPECT_CLEAN = os.environ.get("KVMSNAP_BENCH_EXPECT_CLEAN", "1") == "1"
HANDWRITTEN = os.environ.get("KVMSNAP_BENCH_HANDWRITTEN", "")  # revertToSnapshot | loadvm | none
GUEST = os.environ.get("KVMSNAP_BENCH_GUEST", "")
WORK = float(os.environ.get("KVMSNAP_BENCH_WORK", "0"))  # seconds each test keeps the guest busy
# A pool of hypervisors: URI -> the guest directory of its test guest (its console socket is there)
DIRS = json.loads(os.environ.get("KVMSNAP_BENCH_DIRS", "{}"))


@pytest.fixture(scope="session")
def handwritten_snapshot():
    import libvirt

    dom = libvirt.open(os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system")).lookupByName(GUEST)
    snap = dom.snapshotCreateXML("<domainsnapshot><name>handwritten</name></domainsnapshot>", 0)
    yield dom, snap
    dom.revertToSnapshot(snap, 0)
    snap.delete(0)


def handwritten_revert(dom, snap):
    if HANDWRITTEN == "revertToSnapshot":
        dom.revertToSnapshot(snap, 0)
    elif HANDWRITTEN == "loadvm":
        import libvirt_qemu

        libvirt_qemu.qemuMonitorCommand(dom, f"loadvm {snap.getName()}",
                                        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


@pytest.fixture
def console_path(request):
    if not HANDWRITTEN:
        guest = request.getfixturevalue("kvm_guest")
        yield Path(DIRS.get(guest.uri, guest_dir())) / "sock" / f"{guest.name}.sock"
        return
    dom, snap = request.getfixturevalue("handwritten_snapshot")
    yield guest_dir() / "sock" / f"{dom.name()}.sock"
    handwritten_revert(dom, snap)


@pytest.mark.kvm_snapshot
@pytest.mark.parametrize("i", range(N))
def test_dirty(i, console_path):
    sh = Console(str(console_path))
    sh.wait_ready()
    leftover = sh.run("cat /data/marker /tmp/marker 2>/dev/null").output
    if EXPECT_CLEAN:
        assert leftover == "", f"test {i} found {leftover!r}"
    sh.check(f"echo {i} > /data/marker; echo {i} > /tmp/marker")
    if WORK:
        sh.check(f"sleep {WORK}", timeout=WORK + 20)
