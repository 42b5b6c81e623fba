"""Real guests under a real libvirtd: the proof behind every promise.

Two tiny guests (``kvmsnap-it-a``, ``kvmsnap-it-b``) are built and started once
per session from ``pytest_kvmsnap.testing``; each test drives pytest with the
plugin in a subprocess against them and checks them from outside.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_kvmsnap.testing import Console, GuestImage, build_image, define_guest, remove_guest
from pytest_kvmsnap.testing.debian import DebianImage, build_debian, define_debian, wait_until_settled

URI = os.environ.get("KVMSNAP_TEST_URI", "qemu:///system")
GUESTS = ("kvmsnap-it-a", "kvmsnap-it-b")

# Written into every inner run: a console per guest of the test.
INNER_CONFTEST = textwrap.dedent("""
    import pytest
    from pytest_kvmsnap.testing import Console
    from pytest_kvmsnap.testing.guest import guest_dir

    def console(name):
        c = Console(str(guest_dir() / "sock" / f"{name}.sock"))
        c.wait_ready()
        return c

    @pytest.fixture
    def sh(kvm_guest):
        return console(kvm_guest.name)

    @pytest.fixture
    def shs(kvm_guests):
        return {name: console(name) for name in kvm_guests}
""")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@dataclass
class RealGuest:
    name: str
    console: Console
    image: GuestImage
    uri: str = URI

    def domain(self) -> Any:  # a libvirt.virDomain (libvirt ships no type hints)
        import libvirt

        return libvirt.open(self.uri).lookupByName(self.name)

    def snapshots(self) -> list[str]:
        return sorted(self.domain().snapshotListNames())

    def state(self) -> int:
        return int(self.domain().state()[0])

    def leased(self) -> bool:
        """Is a run's lease on the guest (an inert domain beside it) still on the hypervisor?"""
        return self._lease() is not None

    def drop_lease(self) -> None:
        """What a failed test's killed run may leave: its lease would hold the guest until it expired."""
        lease = self._lease()
        if lease is not None:
            lease.undefine()

    def _lease(self) -> Any:
        import libvirt

        try:
            return libvirt.open(self.uri).lookupByName(self.name + ".kvmsnap-lease")
        except libvirt.libvirtError:
            return None

    def is_pristine(self) -> bool:
        try:
            out = self.console.run("ls /data /tmp", timeout=30).output  # a loaded host answers late
        except Exception:
            return False
        return "marker" not in out and not self.snapshots() and self.state() == 1


@pytest.fixture(scope="session")
def image() -> GuestImage:
    return build_image()


@pytest.fixture(scope="session")
def libvirt_conn():  # type: ignore[no-untyped-def]
    import libvirt

    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open(URI)
    yield conn
    conn.close()


def _fresh(conn, name: str, image: GuestImage) -> RealGuest:  # type: ignore[no-untyped-def]
    define_guest(conn, name, image)
    guest = RealGuest(name, Console(str(image.console_for(name))), image)
    guest.console.wait_ready()
    return guest


@pytest.fixture(scope="session")
def _guests(libvirt_conn, image) -> Iterator[dict[str, RealGuest]]:  # type: ignore[no-untyped-def]
    guests = {name: _fresh(libvirt_conn, name, image) for name in GUESTS}
    yield guests
    for name in GUESTS:
        remove_guest(_live(libvirt_conn), name, image)


def _pristine(guests: dict[str, RealGuest], name: str, conn) -> RealGuest:  # type: ignore[no-untyped-def]
    # A test that failed may have left its guest changed: start the next one clean.
    if not guests[name].is_pristine():
        guests[name] = _fresh(_live(conn), name, guests[name].image)
    guests[name].drop_lease()
    return guests[name]


def _live(conn: Any) -> Any:
    """``conn``, or a new connection if a fault test restarted libvirtd under it."""
    import libvirt

    try:
        conn.getLibVersion()
        return conn
    except libvirt.libvirtError:
        return libvirt.open(URI)


@pytest.fixture
def guest_a(_guests, libvirt_conn) -> RealGuest:  # type: ignore[no-untyped-def]
    return _pristine(_guests, GUESTS[0], libvirt_conn)


@pytest.fixture
def guest_b(_guests, libvirt_conn) -> RealGuest:  # type: ignore[no-untyped-def]
    return _pristine(_guests, GUESTS[1], libvirt_conn)


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(INNER_CONFTEST)
    return pytester


INNER_TIMEOUT = 200.0  # seconds an inner run may take: under the 240 s deadline, so its stacks are seen


# Starts pytest with SIGINT and SIGQUIT at their defaults.  A shell without job
# control starts its background commands with both ignored (POSIX), an ignored
# signal stays ignored across exec, and Python then installs no
# KeyboardInterrupt handler: an inner run the test interrupts would never see
# the Ctrl-C (issue 26).  The inner run must not depend on how the outer suite
# was started.  ``execv`` keeps the pid, which the tests signal.
INTERRUPTIBLE = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                 "signal.signal(signal.SIGQUIT, signal.SIG_DFL); "
                 "os.execv(sys.executable, [sys.executable, '-m', 'pytest', *sys.argv[1:]])")


class InnerRun(subprocess.Popen[bytes]):
    """An inner pytest run whose output goes to ``out``; a wait that times out explains itself.

    On timeout the run gets SIGABRT: pytest's faulthandler (and
    PYTHONFAULTHANDLER=1, for hangs after pytest let go of it) writes every
    thread's stack into ``out``, and the failure shows that output, so an
    intermittent hang is diagnosed from its first report.
    """

    out: Path
    err: Path  # the same file as ``out`` when stderr is merged into it

    def wait(self, timeout: float | None = None) -> int:
        try:
            return super().wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGABRT)
            try:
                super().wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
                super().wait()
            tail = "".join(dict.fromkeys(path.read_text(errors="replace")[-8000:] for path in (self.out, self.err)))
            raise AssertionError(f"the inner pytest run {self.args!r} did not end within {timeout} s; "
                                 f"its output, ending with every thread's stack:\n{tail}") from None


def start_inner(pytester: pytest.Pytester, name: str, *args: str, merge: bool = True) -> InnerRun:
    """``pytest`` with the plugin against the test URI, in the background; output in ``<name>.out``
    (its stderr too, if ``merge``; else in ``<name>.err``)."""
    out = pytester.path / f"{name}.out"
    err = out if merge else pytester.path / f"{name}.err"
    basetemp = pytester.path / f"basetemp-{name}"
    argv = [sys.executable, "-c", INTERRUPTIBLE, f"--basetemp={basetemp}", f"--kvm-uri={URI}", "-p", "no:cacheprovider",
            *args]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pytester.path), env.get("PYTHONPATH", "")]))
    with open(out, "wb") as sink, open(err, "ab") as err_sink:
        run = InnerRun(argv, stdout=sink, stderr=subprocess.STDOUT if merge else err_sink,
                       stdin=subprocess.DEVNULL, cwd=pytester.path, env=env)
    run.out, run.err = out, err
    return run


Spawn = Callable[..., InnerRun]


@pytest.fixture
def spawn(inner: pytest.Pytester) -> Iterator[Spawn]:
    """Start ``pytest`` in the background (output in <name>.out); killed at teardown."""
    started: list[InnerRun] = []

    def start(name: str, *args: str) -> InnerRun:
        run = start_inner(inner, name, "-q", *args)
        started.append(run)
        return run

    yield start
    for proc in started:  # a failed test must not leave a run holding the guest
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def _deadline() -> Iterator[None]:
    """No integration test may hang CI: fail it after 240 s."""
    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError("integration test exceeded 240 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def run_inner(pytester: pytest.Pytester, *args: str, timeout: float = INNER_TIMEOUT) -> pytest.RunResult:
    """One inner run to its end (see :class:`InnerRun`: a hang fails with its threads' stacks)."""
    start = time.monotonic()
    name = f"inner-{len(list(pytester.path.glob('inner-*.out')))}"
    run = start_inner(pytester, name, "-v", *args, merge=False)
    code = run.wait(timeout)
    out, err = (path.read_text(errors="replace").splitlines() for path in (run.out, run.err))
    print("\n".join(out), "\n".join(err), sep="\n")  # shown with a failed test, as pytester's runs are
    return pytest.RunResult(code, out, err, time.monotonic() - start)


# --- the Debian guest: a real distribution, driven over SSH ---------------------------

DEBIAN = "kvmsnap-it-debian"


@dataclass
class DebianGuest:
    """The Debian test guest, checked from outside through its guest agent."""

    name: str
    image: DebianImage

    def domain(self) -> Any:  # a libvirt.virDomain
        return _live_open().lookupByName(self.name)

    def snapshots(self) -> list[str]:
        return sorted(self.domain().snapshotListNames())

    def run(self, command: str) -> tuple[int, str]:
        """``sh -c command`` in the guest through the agent: exit code and output."""
        import libvirt

        dom = self.domain()
        deadline = time.monotonic() + 60
        while True:  # after a revert the agent's channel reconnects for a second or two
            try:
                pid = _agent(dom, "guest-exec", {"path": "/bin/sh", "arg": ["-c", command],
                                                 "capture-output": True})["pid"]
                while not (status := _agent(dom, "guest-exec-status", {"pid": pid}))["exited"]:
                    time.sleep(0.05)
                return int(status["exitcode"]), base64.b64decode(status.get("out-data", "")).decode().strip()
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def assert_as_found(self) -> None:
        assert self.snapshots() == []
        assert self.domain().state()[0] == 1  # running
        assert self.run("test -e /root/marker")[0] != 0, "a test's marker survived the run"
        assert self.run("ps -eo comm= | grep -qx kvmsnap-settle")[0] != 0, "the resident settle process is left"


def _agent(dom: Any, command: str, arguments: dict[str, Any]) -> Any:
    import json

    import libvirt_qemu

    message = json.dumps({"execute": command, "arguments": arguments})
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, message, 10, 0))["return"]


def _live_open() -> Any:
    import libvirt

    return libvirt.open(URI)


@pytest.fixture(scope="session")
def _debian_guest() -> Iterator[DebianGuest]:
    """Built (cached) and booted once per session, only for the tests that ask for it."""
    image = build_debian()
    # Baselines are taken from a settled guest: one mid-boot replays the boot after every revert.
    wait_until_settled(define_debian(_live_open(), DEBIAN, image))
    guest = DebianGuest(DEBIAN, image)
    yield guest
    remove_guest(_live_open(), DEBIAN)
    image.disk_for(DEBIAN).unlink(missing_ok=True)


@pytest.fixture
def debian(_debian_guest: DebianGuest) -> DebianGuest:
    # A failed test may have left a marker or a snapshot: start each one as found.
    for snap in _debian_guest.domain().listAllSnapshots():
        snap.delete(0)
    _debian_guest.run("rm -f /root/marker")
    return _debian_guest


# Written into the Debian tests' inner runs: SSH to the test's guest, as a user would.
SSH_CONFTEST = textwrap.dedent("""
    import paramiko, pytest

    KEY = "{key}"

    def connect(guest):
        host, port = guest.address(22)
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        client.connect(host, port, "root", key_filename=KEY, look_for_keys=False, allow_agent=False,
                       timeout=10, banner_timeout=10, auth_timeout=10)
        return client

    def run(client, command):
        _, out, _ = client.exec_command(command, timeout=30)
        return out.read().decode().strip()

    @pytest.fixture
    def ssh(kvm_guest):
        client = connect(kvm_guest)
        yield lambda command: run(client, command)
        client.close()
""")
