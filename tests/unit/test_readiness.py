"""After a revert: the wait settings, the revert hooks and the generation, on libvirt's test driver.

The clock, entropy and SSH waits themselves need a real guest with an agent and
sshd: tests/integration/test_debian.py.
"""

from __future__ import annotations

import platform
import socket
import subprocess
import time

import pytest

from pytest_kvmsnap.config import NamedAddress, Settings, parse_wait
from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.guestside import (
    CLOCK_FAILED,
    NO_PERL,
    RESEED_PERL,
    RESIDENT_PERL,
    RESIDENT_QUIT_PERL,
    partial,
    settle_command,
    settle_perl,
    settle_script,
)
from pytest_kvmsnap.readiness import NotReady, Readiness
from pytest_kvmsnap.resident import Resident, ResidentUnavailable, check_answer
from tests.conftest import TestDriver
from tests.unit.helpers import run_unit, three_tests


@pytest.fixture
def guest(testdriver: TestDriver) -> str:
    return testdriver.define()


@pytest.mark.parametrize(("option", "message"), [
    ("--kvm-wait=sometimes", "kvm_wait = 'sometimes' is not one of agent, ssh, hook, tcp:PORT"),
    ("--kvm-wait=tcp:", "kvm_wait = 'tcp:' is not one of agent, ssh, hook, tcp:PORT"),
    ("--kvm-wait=tcp:99999",
     "kvm_wait = 'tcp:99999' is not one of agent, ssh, hook, tcp:PORT (a port from 1 to 65535)"),
    ("--kvm-wait=tcp:0", "kvm_wait = 'tcp:0' is not one of agent, ssh, hook, tcp:PORT (a port from 1 to 65535)"),
    ("--kvm-wait-timeout=-1", "kvm_wait_timeout = '-1' must be 0 or more"),
    ("--kvm-sync-clock=maybe", "invalid choice: 'maybe'"),
])
def test_bad_wait_settings_stop_the_run(pytester: pytest.Pytester, option: str, message: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = run_unit(pytester, option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


HOOK_LOG = """
def pytest_kvmsnap_before_revert(config, domain, snapshot, reason):
    open("hooks.log", "a").write(f"before {reason.split()[0]}\\n")

def pytest_kvmsnap_after_revert(config, domain, generation, seconds, steps):
    open("hooks.log", "a").write(f"after {generation} {'+'.join(steps) or '-'}\\n")
"""


def test_revert_hooks_and_generation(pytester: pytest.Pytester, guest: str) -> None:
    """before_revert right before each revert; after_revert once the next test may use the guest."""
    pytester.makeconftest(HOOK_LOG)
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest}")
        @pytest.mark.parametrize("i", [1, 2, 3])
        def test_t(i, kvm_guest):
            assert kvm_guest.generation == i - 1
    """)
    run_unit(pytester).assert_outcomes(passed=3)
    assert (pytester.path / "hooks.log").read_text().splitlines() == [
        "after 0 -", "before after", "after 1 -", "before after", "after 2 -", "before after"]


def test_wait_hook_is_called_with_the_guest_after_each_revert(pytester: pytest.Pytester, guest: str) -> None:
    pytester.makeconftest("""
        def pytest_kvmsnap_ready(config, guest, timeout):
            open("ready.log", "a").write(f"{guest.name} {guest.generation} {timeout > 0}\\n")
    """)
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester, "--kvm-wait=hook", "-v")
    result.assert_outcomes(passed=3)
    assert (pytester.path / "ready.log").read_text().splitlines() == [f"{guest} {n} True" for n in (0, 1, 2)]
    result.stdout.fnmatch_lines([f"{guest}: baseline * 3 revert(s)*; ready after 3 of them in median * s (hook)"])


def test_wait_hook_without_an_implementation_stops_the_run_before_any_guest_is_touched(
        pytester: pytest.Pytester, testdriver: TestDriver, guest: str) -> None:
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester, "--kvm-wait=hook")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*kvmsnap: --kvm-wait=hook, but no pytest_kvmsnap_ready(config, guest, timeout) "
                                 "hook is implemented: add one to a conftest.py or a plugin*"])
    assert testdriver.snapshots(guest) == []


def test_a_failing_wait_hook_errors_the_next_test_and_is_tried_again(pytester: pytest.Pytester, guest: str) -> None:
    pytester.makeconftest("""
        calls = []
        def pytest_kvmsnap_ready(config, guest, timeout):
            calls.append(guest.generation)
            if len(calls) == 2:
                raise RuntimeError("service not up yet")
    """)
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester, "--kvm-wait=hook")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*RuntimeError: service not up yet"])


# --- a wait whose target this host never reaches (issue 25) -----------------------

def _readiness(wait_timeout: float) -> Readiness:
    settings = Settings(uri="test:///default", wait=parse_wait("tcp:8080"), wait_timeout=wait_timeout, sync_clock="off",
                        reseed="off")
    return Readiness(settings, lambda event: None, lambda name, timeout: None, lambda exc: False)


def test_a_target_no_attempt_reached_is_not_waited_for_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """No route, or silence: every attempt of the whole wait failed to open a connection (faked
    here, nothing leaves this host).  The next test's wait fails at once, saying why."""
    attempts: list[tuple[str, int]] = []

    def unreachable(address: tuple[str, int], timeout: float) -> socket.socket:
        attempts.append(address)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    ready = _readiness(0.3)
    address = lambda port: ("10.0.2.15", port)  # noqa: E731  (a user-mode network's inside)
    with pytest.raises(NotReady, match=r"guest 'g': 10.0.2.15:8080 \(its port 8080\) cannot be reached from this "
                                       r"host: no connection opened during the whole 0 s wait \(timed out\); "
                                       r"later tests do not wait for it again.*hostfwd in <qemu:commandline>"):
        ready.settle("g", None, address, restored=False)  # type: ignore[arg-type]
    tried = len(attempts)
    assert tried >= 2
    start = time.monotonic()
    with pytest.raises(NotReady, match="cannot be reached from this host"):
        ready.settle("g", None, address, restored=False)  # type: ignore[arg-type]
    assert len(attempts) == tried and time.monotonic() - start < 0.1, "the second wait waited again"


def test_a_host_that_refuses_is_a_slow_guest_and_is_waited_for_again() -> None:
    """A refused connection reached the host (a port not open yet): the next test waits again."""
    with socket.socket() as closed:  # a loopback port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = int(closed.getsockname()[1])
    ready = _readiness(0.3)
    for _ in range(2):
        with pytest.raises(NotReady, match=r"was not ready within 0 s after the revert: waited for a TCP "
                                           rf"connection on 127.0.0.1:{port} \(guest port 8080\)"):
            ready.settle("g", None, lambda _port: ("127.0.0.1", port), restored=False)  # type: ignore[arg-type]


# --- clock and reseed over the test's SSH connection (issue 25) ----------------------

class AgentGuest:
    """A machine whose agent answers and records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, bool]] = []
        self.clock_resets = 0  # RTC reinjection resets asked of the hypervisor

    def has_agent(self) -> bool:
        return True

    def agent_answers(self, timeout: int = 2) -> bool:
        return True

    def refresh(self, clock: bool, reseed: bool) -> str | None:
        self.calls.append((clock, reseed))
        return None

    def clock_set(self) -> None:
        self.clock_resets += 1


class Shell:
    def __init__(self, fails: bool = False, resident: KvmSnapError | None = None) -> None:
        self.fails, self.calls, self.resident, self.asked = fails, 0, resident, 0

    def settle(self, clock: bool, reseed: bool) -> str | None:
        self.calls += 1
        if self.fails:
            raise KvmSnapError("ssh root@127.0.0.1:2222 (guest 'g'): no connection within 30 s")
        return None

    def ask_resident(self, resident: Resident, clock: bool, reseed: bool) -> None:
        self.asked += 1
        if self.resident is not None:
            raise self.resident


def _settling(shell: Shell | None, events: list[object]) -> Readiness:
    return Readiness(Settings(uri="test:///default"), events.append, lambda name, timeout: None, lambda exc: False,
                     lambda name: shell)


def test_with_a_kvm_ssh_connection_the_clock_and_the_reseed_go_over_it() -> None:
    machine, shell, events = AgentGuest(), Shell(), list[object]()
    steps = _settling(shell, events).settle("g", machine, lambda port: ("127.0.0.1", port),  # type: ignore[arg-type]
                                            restored=True)
    assert steps == ["clock via ssh", "reseed via ssh"]
    assert shell.calls == 1 and machine.calls == [], "the agent was used as well"
    assert machine.clock_resets == 1, "the hypervisor would replay the ticks the guest missed"


def test_without_one_they_go_through_the_agent_in_one_step() -> None:
    machine, events = AgentGuest(), list[object]()
    steps = _settling(None, events).settle("g", machine, lambda port: ("127.0.0.1", port),  # type: ignore[arg-type]
                                           restored=True)
    assert steps == ["clock", "reseed"] and machine.calls == [(True, True)]


def test_a_failing_ssh_connection_falls_back_to_the_agent_saying_why() -> None:
    machine, shell, events = AgentGuest(), Shell(fails=True), list[object]()
    steps = _settling(shell, events).settle("g", machine, lambda port: ("127.0.0.1", port),  # type: ignore[arg-type]
                                            restored=True)
    assert steps == ["clock", "reseed"] and machine.calls == [(True, True)]
    assert [str(getattr(event, "text", "")) for event in events] == [
        "kvmsnap: g: clock and reseed over SSH failed, through the guest agent instead: "
        "ssh root@127.0.0.1:2222 (guest 'g'): no connection within 30 s"]


def test_the_guest_side_script_is_valid_sh_and_says_which_step_failed() -> None:
    for clock, reseed in [(True, True), (True, False), (False, True)]:
        assert subprocess.run(["sh", "-n", "-c", settle_script(clock, reseed)], check=False).returncode == 0
    # no arguments: it asks for the time when it is ready, and reads it from its input
    asked = subprocess.run(["sh", "-c", settle_script(False, False)], input="1.5 00\n", capture_output=True,
                           text=True, check=True)
    assert asked.stdout == "ready\n"
    assert partial(NO_PERL, "") == "no perl in the guest to force a reseed; fresh bytes were mixed in without it"
    assert partial(CLOCK_FAILED, "date: cannot set date: Operation not permitted\n") == (
        "setting the clock failed (exit 10): date: cannot set date: Operation not permitted")



def test_the_guest_side_perl_is_valid_and_finds_the_clock_system_call() -> None:
    """perl's own ELF header names the architecture (no module to load); run here with the
    system calls swapped for prints, so that the host's clock is never touched."""
    for clock, reseed in [(True, True), (True, False), (False, True)]:
        assert subprocess.run(["perl", "-c", "-e", settle_perl(clock, reseed)], capture_output=True,
                              check=False).returncode == 0
        assert subprocess.run(["sh", "-n", "-c", settle_command(clock, reseed)], check=False).returncode == 0
    assert subprocess.run(["perl", "-c", "-e", RESEED_PERL], capture_output=True, check=False).returncode == 0
    program = settle_perl(True, False)
    dry = program.replace("syscall(", "print(").replace('system("date"', 'system("true"')
    assert "syscall(" not in dry and 'system("date"' not in dry and dry.count("print(") == 1
    asked = subprocess.run(["perl", "-e", dry], input=b"1.5 00\n", capture_output=True, check=False)
    assert asked.stdout.startswith(b"ready\n")
    if platform.machine() == "x86_64":  # clock_settime is system call 227 there
        assert asked.stdout[len(b"ready\n"):].startswith(b"2270")


# --- an address the user names (issue 25 item 3) ---------------------------------------

def test_a_named_address_is_used_as_given(pytester: pytest.Pytester, guest: str) -> None:
    """No hypervisor lookup: HOST:PORT is the guest's SSH port; HOST alone serves every port."""
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest}")
        def test_ssh_port(kvm_guest):
            assert kvm_guest.address() == ("127.0.0.1", 2222)
            with pytest.raises(Exception, match="names only where the SSH port of guest '{guest}' is"):
                kvm_guest.address(8080)
    """)
    run_unit(pytester, f"--kvm-address={guest}=127.0.0.1:2222").assert_outcomes(passed=1)
    pytester.makeini(f"[pytest]\nkvm_address =\n    {guest}=127.0.0.5\n    other=[::1]:2200\n")
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest}")
        def test_every_port(kvm_guest):
            assert kvm_guest.address(8080) == ("127.0.0.5", 8080)
    """)
    run_unit(pytester).assert_outcomes(passed=1)


@pytest.mark.parametrize(("args", "message"), [
    (["--kvm-address=web"], "kvm_address = 'web' is not NAME=HOST or NAME=HOST:PORT (a port from 1 to 65535)"),
    (["--kvm-address=web=127.0.0.1:70000"], "kvm_address = 'web=127.0.0.1:70000' is not NAME=HOST or NAME=HOST:PORT"),
    (["--kvm-address=web=h", "--kvm-address=web=h:22"], "kvm_address names guest 'web' twice"),
    (["--kvm-address=web=h", "--kvm-clones=2"], "kvm_address and kvm_clones do not go together"),
])
def test_a_bad_named_address_stops_the_run(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = run_unit(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_a_named_address_that_fails_the_wait_is_what_the_advice_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user named the address: the error points at that setting, not at forwards or networks."""
    settings = Settings(uri="test:///default", wait=parse_wait("ssh"), wait_timeout=0.3, sync_clock="off",
                        reseed="off", addresses=(("g", NamedAddress("127.0.0.1", 2222)),))
    ready = Readiness(settings, lambda event: None, lambda name, timeout: None, lambda exc: False)

    def silent(address: tuple[str, int], timeout: float) -> socket.socket:
        raise TimeoutError("timed out")  # faked: nothing leaves this host

    with monkeypatch.context() as patch:
        patch.setattr(socket, "create_connection", silent)
        with pytest.raises(NotReady, match=r"cannot be reached from this host.*That is the address --kvm-address "
                                           r"names for it: correct that setting$"):
            ready.settle("g", None, lambda port: ("127.0.0.1", 2222), restored=False)  # type: ignore[arg-type]
    with socket.socket() as closed:  # a loopback port nobody listens on: refused, so "not ready"
        closed.bind(("127.0.0.1", 0))
        port = int(closed.getsockname()[1])
    with pytest.raises(NotReady, match=rf"an SSH banner on 127.0.0.1:{port} \(guest port 22, named by --kvm-address\)"):
        ready.settle("g", None, lambda _port: ("127.0.0.1", port), restored=False)  # type: ignore[arg-type]


# --- the resident settle process (resident.py) ------------------------------------------

RESIDENT = Resident(40000, 321, "t0ken")


def _settle_with(shell: Shell, machine: AgentGuest, events: list[object]) -> list[list[str]]:
    readiness = _settling(shell, events)
    return [readiness.settle("g", machine, lambda port: ("127.0.0.1", port),  # type: ignore[arg-type]
                             restored=True, resident=RESIDENT) for _ in range(2)]


def test_with_a_resident_process_no_settle_program_runs() -> None:
    machine, shell, events = AgentGuest(), Shell(), list[object]()
    assert _settle_with(shell, machine, events) == [["clock via resident", "reseed via resident"]] * 2
    assert (shell.asked, shell.calls, machine.calls, events) == (2, 0, [], [])
    assert machine.clock_resets == 2, "the hypervisor would replay the ticks the guest missed"


def test_a_resident_process_that_cannot_be_asked_is_said_once_and_the_settle_program_runs() -> None:
    machine, events = AgentGuest(), list[object]()
    shell = Shell(resident=ResidentUnavailable("sshd did not connect to it"))
    assert _settle_with(shell, machine, events) == [["clock via ssh", "reseed via ssh"]] * 2
    assert (shell.asked, shell.calls) == (2, 2), "a snapshot without it (the user's own) need not mean all lack it"
    assert [str(getattr(event, "text", "")) for event in events] == [
        "kvmsnap: g: its resident settle process could not be asked (sshd did not connect to it); settling with "
        "one guest process instead"]
    refused, shell = list[object](), Shell(resident=ResidentUnavailable("administratively prohibited", lasting=True))
    _settle_with(shell, machine, refused)
    assert (shell.asked, shell.calls, len(refused)) == (1, 2, 1), "sshd refusing forwarding is not asked again"


def test_a_resident_process_whose_step_failed_hands_over_to_the_agent() -> None:
    machine, events = AgentGuest(), list[object]()
    shell = Shell(resident=KvmSnapError("setting the clock failed (exit 10): clock_settime: Operation not permitted"))
    assert _settle_with(shell, machine, events)[0] == ["clock", "reseed"]
    assert shell.calls == 0 and machine.calls == [(True, True)] * 2


def test_the_resident_answers_are_read_as_the_settle_programs_exit_codes() -> None:
    check_answer("ok\n")
    with pytest.raises(KvmSnapError, match=r"^the forced reseed failed \(exit 11\): RNDRESEEDCRNG: EPERM$"):
        check_answer("fail 11 RNDRESEEDCRNG: EPERM\n")
    for answer in ("denied\n", "", "SSH-2.0-OpenSSH_9.2\n"):
        with pytest.raises(ResidentUnavailable):
            check_answer(answer)
    assert Resident.from_record(RESIDENT.as_record()) == RESIDENT
    assert Resident.from_record([]) is None and Resident.from_record([1, "2", "x"]) is None
    line = RESIDENT.request(clock=True, reseed=False).decode()
    token, seconds, entropy, steps = line.split()
    assert (token, steps, len(bytes.fromhex(entropy))) == ("t0ken", "c", 64) and abs(float(seconds) - time.time()) < 5


def test_the_resident_program_serves_its_token_only_and_quits_when_asked() -> None:
    """Run here, its clock and ioctl calls swapped for stubs (the host's clock is never touched)."""
    stubs = "sub fake_syscall { 0 } sub fake_ioctl { 1 } "
    dry = stubs + RESIDENT_PERL.replace("syscall(", "fake_syscall(").replace("ioctl(", "fake_ioctl(")
    assert "syscall(" not in dry.replace("fake_syscall(", "") and "ioctl(" not in dry.replace("fake_ioctl(", "")
    started = subprocess.run(["perl", "-e", dry], input=b"secret\n", capture_output=True, timeout=10, check=True)
    port, _pid = map(int, started.stdout.split())
    resident = Resident(port, _pid, "secret")

    def ask(line: bytes) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, sock.makefile("rwb") as stream:
            stream.write(line)
            stream.flush()
            return stream.readline().decode()

    assert ask(resident.request(clock=True, reseed=True)) == "ok\n"
    assert ask(b"wrong 1.5 00 cr\n") == "denied\n"
    # A second start (a killed run's brought back by a restore, then a new run's) stops the first.
    again = subprocess.run(["perl", "-e", dry], input=b"other\n", capture_output=True, timeout=10, check=True)
    second = int(again.stdout.split()[0])
    time.sleep(0.5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    quit_ = subprocess.run(["perl", "-e", RESIDENT_QUIT_PERL, str(second)], input=b"other quit\n", timeout=10,
                           check=False)
    assert quit_.returncode == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", second), timeout=5).close()
