"""Fault injection on a real guest: one fault each, then a check from outside.

Each test breaks something under a run -- QEMU, libvirtd, the lock directory,
the caller's permissions, the guest's state at start -- and then checks with
libvirt and the guest's console that nothing was lost: state, disk and memory
content, snapshot list, no run record or lock left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import URI, RealGuest, run_inner
from tests.integration.test_semantics import CLEAN, assert_as_found, three_dirty_tests

REPO = Path(__file__).resolve().parents[2]
WAIT_FOR_STATE = """
def wait_for_state(dom, wanted, seconds=30):
    import time
    deadline = time.monotonic() + seconds
    while dom.state()[0] != wanted:
        assert time.monotonic() < deadline, f"state {dom.state()} never became {wanted}"
        time.sleep(0.05)
"""


def test_qemu_killed_mid_test(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    """The test errors with the reason; the next test gets the guest back at its baseline."""
    inner.makepyfile(WAIT_FOR_STATE + f"""
import os, signal, libvirt, pytest

@pytest.mark.kvm_snapshot("{guest_a.name}", scope="module")
def test_1_qemu_dies(sh, kvm_guest):
    sh.check("echo damage > /data/marker; echo damage > /tmp/marker")
    pid = int(open("/var/run/libvirt/qemu/{guest_a.name}.pid").read())
    os.kill(pid, signal.SIGKILL)
    wait_for_state(kvm_guest.domain, libvirt.VIR_DOMAIN_SHUTOFF)

@pytest.mark.kvm_snapshot("{guest_a.name}", scope="module")
def test_2_same_unit_gets_it_back(sh):
    assert sh.run("{CLEAN}").status == 0
    sh.check("echo again > /data/marker")
""")
    result = run_inner(inner)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines([f"*guest '{guest_a.name}' went down during the test: its QEMU process "
                                 "exited unexpectedly*restored to its baseline for the next test*"])
    assert_as_found(guest_a)


def test_libvirtd_restarted_mid_run(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    """The plugin reconnects once and goes on; QEMU (and the guest's RAM) survive the restart.

    Test 2 outlasts the run's 24 s lease: the renewals resumed on a new connection too.
    A lease survives a hypervisor out of reach for three quarters of it (18 s here);
    this restart keeps libvirtd away for 2 to 10 s on this machine.
    """
    inner.makepyfile(f"""
import os, signal, subprocess, time, pytest

def restart_libvirtd():
    pid = int(open("/var/run/libvirtd.pid").read())
    os.kill(pid, signal.SIGTERM)
    while os.path.exists(f"/proc/{{pid}}"):
        time.sleep(0.05)
    subprocess.run(["bash", "{REPO}/scripts/setup-host.sh"], check=True, stdout=subprocess.DEVNULL)

@pytest.mark.kvm_snapshot("{guest_a.name}")
@pytest.mark.parametrize("i", [1, 2, 3])
def test_each(i, sh):
    assert sh.run("{CLEAN}").status == 0
    sh.check("echo {{i}} > /data/marker; echo {{i}} > /tmp/marker")
    if i == 1:
        restart_libvirtd()
    if i == 2:
        time.sleep(25)
""")
    result = run_inner(inner, "--kvm-lease-expiry=24")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"kvmsnap: reconnected to {URI}: the connection was lost (libvirtd restarted?)*",
                                 f"{guest_a.name}: baseline kvmsnap-* 3 revert(s)*"])
    assert_as_found(guest_a)


@pytest.fixture
def full_lock_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A lock directory on a 64 KiB tmpfs, filled to the last byte."""
    path = tmp_path / "full"
    path.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path)], check=True)
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={path}/filler", "bs=4k"], stderr=subprocess.DEVNULL)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_lock_dir_full(inner: pytest.Pytester, guest_a: RealGuest, full_lock_dir: Path) -> None:
    """One clear error, before anything changes on the guest."""
    inner.makepyfile(three_dirty_tests(guest_a.name))
    result = run_inner(inner, f"--kvm-lock-dir={full_lock_dir}")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines([f"*cannot write the run record for guest '{guest_a.name}' in {full_lock_dir}: "
                                 "No space left on device. Free space there or point --kvm-lock-dir elsewhere."])
    assert "Traceback" not in result.stdout.str()
    assert not list(full_lock_dir.glob("*.json")) and not list(full_lock_dir.glob("*.tmp"))
    assert_as_found(guest_a)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory user nobody can read (pytest's tmp_path is under a 0700 parent)."""
    path = Path(tempfile.mkdtemp(prefix="kvmsnap-nobody-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_permission_denied_on_system_uri(public_dir: Path, guest_a: RealGuest) -> None:
    """An unprivileged user gets the fix (group libvirt, or qemu:///session), not a traceback."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    tmp_path = public_dir
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_x.py").write_text(f"""
import pytest
@pytest.mark.kvm_snapshot("{guest_a.name}")
def test_x(kvm_guest):
    pass
""")
    (tmp_path / "test_x.py").chmod(0o644)
    result = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m", "pytest",
         "-p", "no:cacheprovider", "--kvm-uri=qemu:///system", "test_x.py"],
        cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, HOME=str(tmp_path)), timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "permission was denied: run as root, add your user to the 'libvirt' group" in result.stdout
    assert "Traceback" not in result.stdout
    assert_as_found(guest_a)


def two_tests_on(guest: RealGuest, state: str) -> str:
    """The start of two inner tests that each first check the guest is in ``state``."""
    return f"""
import libvirt, pytest
from pytest_kvmsnap.testing import Console
from pytest_kvmsnap.testing.guest import guest_dir

@pytest.mark.kvm_snapshot("{guest.name}")
@pytest.mark.parametrize("i", [1, 2])
def test_from_{state.lower()}(i, kvm_guest):
    assert kvm_guest.domain.state()[0] == libvirt.VIR_DOMAIN_{state}"""


def test_guest_paused_at_start(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    """The baseline of a paused guest is paused: each test gets it paused, the run leaves it paused."""
    import libvirt

    dom = guest_a.domain()
    dom.suspend()
    inner.makepyfile(two_tests_on(guest_a, "PAUSED") + f"""
    kvm_guest.domain.resume()
    sh = Console(str(guest_dir() / "sock" / "{guest_a.name}.sock"))
    assert sh.run("{CLEAN}").status == 0
    sh.check("echo {{i}} > /data/marker; echo {{i}} > /tmp/marker")
""")
    try:
        run_inner(inner).assert_outcomes(passed=2)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    finally:
        dom.resume()
    assert_as_found(guest_a)


def test_guest_shut_off_at_start(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    """The baseline of a shut-off guest is its disks: each test starts it from them."""
    import libvirt

    dom = guest_a.domain()
    dom.destroy()
    inner.makepyfile(two_tests_on(guest_a, "SHUTOFF") + f"""
    kvm_guest.domain.create()
    sh = Console(str(guest_dir() / "sock" / "{guest_a.name}.sock"))
    sh.wait_ready()
    assert sh.run("! ls /data/marker").status == 0
    sh.check("echo {{i}} > /data/marker; sync")
""")
    result = run_inner(inner)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*revert method for kvmsnap-*: restart (snapshot * was taken while the "
                                 "guest was not running)"])
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    assert guest_a.snapshots() == []
    dom.create()
    guest_a.console.wait_ready()
    assert_as_found(guest_a)
