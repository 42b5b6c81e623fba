"""The kill-point matrix on a real guest: something dies *inside* an operation.

Each case kills one process at one point -- the pytest process while the
baseline is written, during an in-place ``loadvm``, during a libvirt revert,
during the end-of-session restore; libvirtd or QEMU during a revert; an xdist
worker in setup, call or teardown of a class unit; and fills the image's file
system while the baseline is written.  Afterwards the guest is exactly as
found -- its disk, the RAM marker it was found with, its snapshot list, no run
record, its lock free -- in the same run where the run survives, else after
``--kvm-cleanup`` or the next run, and one line said what happened.

Two more cases live with the layers they test (``test_layers.py``): a kill inside
the checkpoint after a session fixture, and one inside the revert down a layer
after a module fixture's teardown; ``--kvm-cleanup`` restores the baseline.

The kills are placed by the plugin's own ``pytest_kvmsnap_before_revert``
hook (or, for the baseline, the run record appearing, which is written just
before the snapshot): a timer fires a few ms into the operation, which ~80 MB
of non-zero guest RAM stretch to a few hundred ms.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kvmsnap.testing import Console, GuestImage, define_guest, remove_guest
from pytest_kvmsnap.testing.guest import _socket_dir
from tests.integration.conftest import INNER_CONFTEST, URI, RealGuest, _live, run_inner
from tests.integration.test_semantics import CLEAN, assert_as_found

REPO = Path(__file__).resolve().parents[2]
FOUND = "echo found > /tmp/found"  # RAM the guest is found with: every outcome must keep it
STRETCH = "yes abcdefghijklmnop | head -c 80000000 > /tmp/fill 2>/dev/null; true"

KILLER = INNER_CONFTEST + f"""
import os, signal, subprocess, threading, time
from pathlib import Path

KILL = os.environ.get("KVMSNAP_KILL", "")  # target:point, e.g. pytest:after, libvirtd:after
DELAY = float(os.environ.get("KVMSNAP_KILL_DELAY", "0.03"))
target, _, point = KILL.partition(":")
fired = []

def kill(domain):
    if target == "pytest":
        os.kill(os.getpid(), signal.SIGKILL)
    elif target == "libvirtd":
        os.kill(int(Path("/var/run/libvirtd.pid").read_text()), signal.SIGKILL)
        time.sleep(0.5)
        subprocess.run(["bash", "{REPO}/scripts/setup-host.sh"], check=True, stdout=subprocess.DEVNULL)
    elif target == "qemu":
        os.kill(int(Path(f"/var/run/libvirt/qemu/{{domain}}.pid").read_text()), signal.SIGKILL)

def pytest_kvmsnap_before_revert(config, domain, snapshot, reason):
    if point and reason.startswith(point) and not fired:
        fired.append(reason)
        threading.Timer(DELAY, kill, (domain,)).start()

def pytest_kvmsnap_reverted(config, domain, snapshot, seconds, method, reason):
    if point == "reverted" and not fired:  # QEMU dies between tests: after a revert, before the next
        fired.append(reason)
        kill(domain)
        import libvirt
        dom = libvirt.open(os.environ["KVMSNAP_KILL_URI"]).lookupByName(domain)
        while dom.isActive():
            time.sleep(0.05)

def pytest_configure(config):
    if point != "baseline":
        return
    locks = Path(os.environ["KVMSNAP_KILL_LOCKS"])
    def watch():  # the record is written just before the snapshot is taken
        while not list(locks.glob("*.json")):
            time.sleep(0.002)
        time.sleep(DELAY)
        kill("")
    threading.Thread(target=watch, daemon=True).start()
"""

TESTS = """
import time, pytest
@pytest.mark.kvm_snapshot("{name}")
@pytest.mark.parametrize("i", range(3))
def test_each(i, sh):
    assert sh.run("{clean}").status == 0, "the previous test's state leaked"
    assert sh.check("cat /tmp/found") == "found"
    sh.check(f"echo {{i}} > /data/marker; echo {{i}} > /tmp/marker")
"""

# (case, KVMSNAP_KILL, delay, extra pytest args, how the guest is recovered: the run itself survives,
#  or --kvm-cleanup, or the next run)
CASES = [
    ("pytest during savevm", "pytest:baseline", 0.02, [], "cleanup"),
    ("pytest during in-place loadvm", "pytest:after", 0.03, [], "next run"),
    ("pytest during a restart revert", "pytest:after", 0.3, ["--kvm-revert-method=restart"], "cleanup"),
    ("pytest during end-of-session restore", "pytest:end of session", 0.03, ["--kvm-revert=never"], "next run"),
    ("libvirtd during a revert", "libvirtd:after", 0.03, [], "survives"),
    ("QEMU during loadvm", "qemu:after", 0.03, [], "survives"),
    ("QEMU between tests", "qemu:reverted", 0.0, [], "survives"),
]
# The one line that says what happened, from --kvm-cleanup or the next run.
RESTORED = "*kvmsnap: {name}: restored to kvmsnap-* left by dead run * and deleted 1 orphan snapshot(s)"
# Killed 20 ms after the run record appeared: on a loaded host that may still be before
# libvirt began the snapshot; then the dead run left its record alone, and says so.
RECORD_ONLY = "*{name}: removed the record of dead run *"


def stretched(guest: RealGuest) -> None:
    guest.console.check(FOUND)
    guest.console.check(STRETCH, timeout=120)


def as_found(guest: RealGuest, locks: Path) -> None:
    assert guest.console.check("cat /tmp/found") == "found", "the RAM the guest was found with is gone"
    guest.console.check("rm -f /tmp/found /tmp/fill", timeout=60)
    assert not list(locks.glob("*.json")), "a run record was left"
    assert_as_found(guest)


@pytest.mark.parametrize(("case", "kill", "delay", "args", "recovery"), CASES, ids=[c[0] for c in CASES])
def test_a_kill_inside_an_operation(inner: pytest.Pytester, guest_a: RealGuest, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, case: str, kill: str, delay: float,
                                    args: list[str], recovery: str) -> None:
    locks = tmp_path / "locks"
    inner.makeconftest(KILLER)
    inner.makepyfile(TESTS.format(name=guest_a.name, clean=CLEAN))
    stretched(guest_a)
    monkeypatch.setenv("KVMSNAP_KILL", kill)
    monkeypatch.setenv("KVMSNAP_KILL_DELAY", str(delay))
    monkeypatch.setenv("KVMSNAP_KILL_LOCKS", str(locks))
    monkeypatch.setenv("KVMSNAP_KILL_URI", URI)
    result = run_inner(inner, f"--kvm-lock-dir={locks}", *args)
    if recovery == "survives":
        result.assert_outcomes(passed=3)
        expected = {"libvirtd:after": "*lost the connection to libvirtd*reconnecting and trying once more*",
                    "qemu:after": "*revert method for kvmsnap-*: restart (in-place load failed: *",
                    "qemu:reverted": f"*kvmsnap: {guest_a.name}: went down between tests (its QEMU process exited "
                                     "unexpectedly*); restoring it before *"}[kill]
        result.stdout.fnmatch_lines([expected])
    else:
        assert result.ret < 0 or result.ret == -9 or "passed" not in result.stdout.str().splitlines()[-1], \
            f"{case}: the run was not killed"
        monkeypatch.delenv("KVMSNAP_KILL")
        if recovery == "cleanup":
            cleanup = run_inner(inner, f"--kvm-lock-dir={locks}", "--kvm-cleanup", f"--kvm-domain={guest_a.name}")
            assert cleanup.ret == 0
            said = cleanup.stdout.str()
            if "orphan snapshot" in said or kill != "pytest:baseline":
                cleanup.stdout.fnmatch_lines([RESTORED.format(name=guest_a.name)])
            else:
                cleanup.stdout.fnmatch_lines([RECORD_ONLY.format(name=guest_a.name)])
        else:
            (inner.path / "test_a_kill_inside_an_operation.py").write_text(
                TESTS.format(name=guest_a.name, clean=CLEAN).replace("range(3)", "range(1)"))
            after = run_inner(inner, f"--kvm-lock-dir={locks}")
            after.assert_outcomes(passed=1)
            after.stdout.fnmatch_lines([RESTORED.format(name=guest_a.name)])
    as_found(guest_a, locks)


CLASS_UNIT = """
import os, signal, pytest

def die():
    if os.environ["KVMSNAP_DIE_HOW"] == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)

@pytest.fixture
def maybe_die(request):
    phase = os.environ["KVMSNAP_DIE_IN"]
    if phase == "setup" and request.node.name == "test_2":
        die()
    yield
    if phase == "teardown" and request.node.name == "test_2":
        die()

@pytest.mark.kvm_snapshot("{name}", scope="class")
class TestUnit:
    def test_1(self, sh, maybe_die):
        assert sh.run("{clean}").status == 0
        sh.check("echo 1 > /tmp/marker; echo 1 > /data/marker")

    def test_2(self, sh, maybe_die):
        sh.check("echo 2 > /tmp/marker; echo 2 > /data/marker")
        if os.environ["KVMSNAP_DIE_IN"] == "call":
            die()

@pytest.mark.kvm_snapshot("{name}")
@pytest.mark.parametrize("i", range(3))
def test_after(i, sh):
    assert sh.run("{clean}").status == 0, "a dead worker's unit leaked into this test"
    assert sh.check("cat /tmp/found") == "found"
"""


@pytest.mark.parametrize("how", ["sigkill", "exit"])
@pytest.mark.parametrize("phase", ["setup", "call", "teardown"])
def test_an_xdist_worker_killed_inside_a_class_unit(inner: pytest.Pytester, guest_a: RealGuest, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, phase: str, how: str) -> None:
    locks = tmp_path / "locks"
    guest_a.console.check(FOUND)
    monkeypatch.setenv("KVMSNAP_DIE_IN", phase)
    monkeypatch.setenv("KVMSNAP_DIE_HOW", how)
    inner.makepyfile(CLASS_UNIT.format(name=guest_a.name, clean=CLEAN))
    result = run_inner(inner, "-n", "2", "--dist", "loadscope", f"--kvm-lock-dir={locks}")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) + outcomes.get("error", 0) >= 4
    assert "test_after" not in "\n".join(line for line in result.outlines if line.startswith("FAILED")), \
        result.stdout.str()
    result.stdout.fnmatch_lines([f"kvmsnap: {guest_a.name}: previous holder * died; reverting"])
    as_found(guest_a, locks)


@pytest.fixture
def guest_on_a_full_disk(image: GuestImage, libvirt_conn, tmp_path: Path) -> Iterator[RealGuest]:  # type: ignore[no-untyped-def]
    """A guest whose image lives on a 24 MiB tmpfs: room for its disk, not for its memory."""
    mount = image.directory / "full"
    mount.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(mount)], check=True)
    name = "kvmsnap-it-full"
    small = GuestImage(mount, image.kernel, image.initrd, image.disk_template)
    for sub in ("sock", "console"):
        _socket_dir(mount / sub)
    try:
        define_guest(_live(libvirt_conn), name, small)
        guest = RealGuest(name, Console(str(small.console_for(name))), small)
        guest.console.wait_ready()
        yield guest
    finally:
        remove_guest(_live(libvirt_conn), name, small)
        subprocess.run(["umount", str(mount)], check=False)


def test_the_image_file_system_full_while_the_baseline_is_written(inner: pytest.Pytester,
                                                                  guest_on_a_full_disk: RealGuest) -> None:
    guest = guest_on_a_full_disk
    guest.console.check(FOUND)
    guest.console.check("yes abcdefghijklmnop | head -c 40000000 > /tmp/fill 2>/dev/null; true", timeout=120)
    inner.makepyfile(TESTS.format(name=guest.name, clean=CLEAN))
    result = run_inner(inner)
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines([f"*cannot take a baseline snapshot of '{guest.name}': *disk vda "
                                 f"({guest.image.disk_for(guest.name)}) is on a file system with * MiB free*"])
    assert guest.snapshots() == [], "a half snapshot was left"
    assert guest.console.check("cat /tmp/found") == "found"
    assert guest.state() == 1
    guest.console.check("rm -f /tmp/found /tmp/fill", timeout=60)
    assert sys.platform == "linux" and os.geteuid() == 0  # tmpfs mounts need root, as the suite does
    assert URI
