"""Between a revert and the next test: the guest's clock, its entropy, and the wait.

A restored guest runs from the snapshot's moment: its clock is behind, its
random generator replays the saved state, and its services need a moment
before they answer (more so under TCG, which flushes its translated code after
``loadvm``).  So, after the baseline and after each revert, before the next
test's fixtures:

1. if ``sync_clock`` / ``reseed`` apply: set the clock from the host's and mix
   in host randomness with a forced reseed, in one guest process
   (guestside.py); over the SSH connection ``kvm_ssh`` hands the test when the
   run uses one on this guest, else through the guest agent;
2. wait as ``kvm_wait`` says: the agent answers, a TCP port accepts, sshd sends
   its banner, or the user's ``pytest_kvmsnap_ready`` hook returns.

Why SSH first: the agent cannot be reached until about a second after an
in-place ``loadvm`` began.  The load resets the virtio-serial port, QEMU reports
it closed and then open, and libvirt closes its agent connection on the first
event and reopens it on the second -- which QEMU holds back, because it sends
at most one VSERPORT_CHANGE per port and second.  A test that uses ``kvm_ssh``
logs in after every revert anyway; that connection settles the guest at the
cost of one command, and the test then reuses it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.engine import Machine
from pytest_kvmsnap.events import Notice, Reporter
from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.resident import Resident, ResidentUnavailable

T = TypeVar("T")
AGENT_GRACE = 15.0  # seconds an "auto" agent gets to answer before it counts as absent
POLL = 0.2
AGENT_POLL = 0.05  # a ping of an agent libvirt has not reconnected yet fails at once: ask often


class NotReady(KvmSnapError):
    """The guest did not come ready in time after a revert."""


Address = Callable[[int], tuple[str, int]]  # guest port -> where the host connects to it


class GuestShell(Protocol):
    """A command channel into the guest that the test uses too (ssh.GuestSSH)."""

    def settle(self, clock: bool, reseed: bool) -> str | None:
        """Clock and/or reseed in the guest now; None, or why the reseed was partial."""

    def ask_resident(self, resident: Resident, clock: bool, reseed: bool) -> None:
        """The same through the guest's resident settle process (resident.py)."""


class Readiness:
    def __init__(self, settings: Settings, report: Reporter, ready_hook: Callable[[str, float], None],
                 agent_unavailable: Callable[[Exception], bool],
                 shell: Callable[[str], GuestShell | None] = lambda name: None) -> None:
        self.settings = settings
        self.report = report
        self.ready_hook = ready_hook  # (guest name, timeout): the user's pytest_kvmsnap_ready
        self.agent_unavailable = agent_unavailable  # the engine's EngineKind.agent_unavailable
        self.shell = shell  # guest -> the kvm_ssh connection the run uses on it, if any
        self._agent: dict[str, bool] = {}  # guest -> whether its agent is used
        self._no_resident: set[str] = set()  # guests whose sshd refuses a channel to the resident process
        self._resident_noted: set[str] = set()  # guests whose resident process failed once: said once
        # (guest, host, port) a whole wait never reached -> why: not waited for again in this run
        self._unreachable: dict[tuple[str, str, int], str] = {}

    def settle(self, name: str, machine: Machine, address: Address, *, restored: bool,
               resident: Resident | None = None) -> list[str]:
        """Make the guest usable; the steps taken.  ``restored``: its state came from a snapshot;
        ``resident``: the resident settle process its snapshot holds, if any."""
        deadline = time.monotonic() + self.settings.wait_timeout
        steps: list[str] = []
        clock, reseed = self.settings.sync_clock != "off", self.settings.reseed != "off"
        if restored and (clock or reseed):
            steps += self._refresh(name, machine, deadline, clock, reseed, resident)
        if self.settings.wait:
            self._wait(name, machine, address, deadline)
            steps.append(str(self.settings.wait))
        return steps

    def _refresh(self, name: str, machine: Machine, deadline: float, clock: bool, reseed: bool,
                 resident: Resident | None) -> list[str]:
        """Clock and entropy over the test's SSH connection, else the agent; the steps taken."""
        shell, partial, via = self.shell(name), None, ""
        if shell is not None:
            try:
                partial, via = self._over_ssh(name, shell, resident, clock, reseed)
                if clock:
                    machine.clock_set()
            except KvmSnapError as exc:
                self.report(Notice(f"kvmsnap: {name}: clock and reseed over SSH failed, through the guest agent "
                                   f"instead: {exc}"))
        if not via:
            if not self._uses_agent(name, machine, deadline):
                return []
            partial = self._through_agent(machine, deadline, lambda: machine.refresh(clock, reseed))
        if partial:
            self.report(Notice(f"kvmsnap: {name}: reseed: {partial}"))
        return [step + via for step, wanted in (("clock", clock), ("reseed", reseed)) if wanted]

    def _over_ssh(self, name: str, shell: GuestShell, resident: Resident | None, clock: bool,
                  reseed: bool) -> tuple[str | None, str]:
        """Through the resident settle process where the guest's snapshot holds one (no guest
        process started), else one settle program; (why the reseed was partial, how)."""
        if resident is not None and name not in self._no_resident:
            try:
                shell.ask_resident(resident, clock, reseed)
                return None, " via resident"
            except ResidentUnavailable as exc:
                if exc.lasting:
                    self._no_resident.add(name)
                if name not in self._resident_noted:
                    self._resident_noted.add(name)
                    self.report(Notice(f"kvmsnap: {name}: its resident settle process could not be asked ({exc}); "
                                       "settling with one guest process instead"))
        return shell.settle(clock, reseed), " via ssh"

    def _uses_agent(self, name: str, machine: Machine, deadline: float) -> bool:
        """Whether clock and entropy go through the agent: 'on' needs it; 'auto' uses it
        when the guest has the channel and the agent answers (decided once per run)."""
        wanted = {self.settings.sync_clock, self.settings.reseed} - {"off"}
        if not wanted:
            return False
        if name not in self._agent:
            required = "on" in wanted
            present = required or machine.has_agent()
            if present:
                limit = deadline if required else min(deadline, time.monotonic() + AGENT_GRACE)
                present = poll(machine.agent_answers, limit, every=AGENT_POLL)
                if not present and required:
                    raise NotReady(f"guest {name!r}: its guest agent did not answer within "
                                   f"{self.settings.wait_timeout:.0f} s, and --kvm-sync-clock/--kvm-reseed=on "
                                   "need it. Install and start qemu-guest-agent in the guest, or set them to auto.")
                if not present:
                    self.report(Notice(f"kvmsnap: {name}: its guest agent does not answer; the clock is not "
                                       "synced and the entropy not reseeded after reverts in this run"))
            self._agent[name] = present
        return self._agent[name]

    def _through_agent(self, machine: Machine, deadline: float, step: Callable[[], T]) -> T:
        """Run an agent step, again while the agent's channel is still reconnecting."""
        while True:
            try:
                return step()
            except Exception as exc:
                if not self.agent_unavailable(exc) or time.monotonic() >= deadline:
                    raise
            poll(machine.agent_answers, deadline, every=AGENT_POLL)

    def _wait(self, name: str, machine: Machine, address: Address, deadline: float) -> None:
        wait = self.settings.wait
        if wait.kind == "hook":
            self.ready_hook(name, max(0.0, deadline - time.monotonic()))
            return
        if wait.kind == "agent":
            if not poll(machine.agent_answers, deadline, every=AGENT_POLL):
                self._not_ready(name, "the guest agent to answer guest-ping")
            return
        port = wait.port
        host, host_port = address(port)
        target = (name, host, host_port)
        if target in self._unreachable:
            raise NotReady(self._unreachable[target])
        probe = Probe(host, host_port, banner=wait.kind == "ssh")
        if poll(probe, deadline):
            return
        # An address the user named is what to check first, not the network or the guest.
        named = self.settings.named_address(name) is not None
        if probe.unreachable():  # not a slow guest: an address this host does not reach
            self._unreachable[target] = (
                f"guest {name!r}: {host}:{host_port} (its port {port}) cannot be reached from this host: no "
                f"connection opened during the whole {self.settings.wait_timeout:.0f} s wait ({probe.error}); "
                "later tests do not wait for it again in this run. " + (
                    "That is the address --kvm-address names for it: correct that setting" if named else
                    "Forward the port to this host (on a user-mode network: a hostfwd in <qemu:commandline>, or "
                    "an <interface type='user'>, which the plugin forwards itself), or put the guest on a "
                    "network this host routes to"))
            raise NotReady(self._unreachable[target])
        self._not_ready(name, f"{'an SSH banner' if probe.banner else 'a TCP connection'} on {host}:{host_port} "
                              f"(guest port {port}{', named by --kvm-address' if named else ''})")

    def _not_ready(self, name: str, what: str) -> None:
        raise NotReady(f"guest {name!r} was not ready within {self.settings.wait_timeout:.0f} s after the "
                       f"revert: waited for {what} (--kvm-wait={self.settings.wait}). Raise --kvm-wait-timeout, "
                       "or check the guest's console log.")


def poll(ready: Callable[[], bool], deadline: float, every: float = POLL) -> bool:
    """Ask ``ready`` until it says yes (True) or ``deadline`` (monotonic) passes (False)."""
    while True:
        if ready():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


class Probe:
    """Asks whether ``host:port`` answers (see :func:`_answers`), remembering whether any
    attempt reached the host at all: refused or accepted, not silence or no route."""

    def __init__(self, host: str, port: int, banner: bool) -> None:
        self.host, self.port, self.banner = host, port, banner
        self.reached = self.ok = False
        self.error = "no attempt"

    def __call__(self) -> bool:
        try:
            self.ok = _answers(self.host, self.port, self.banner)
            self.reached = True
        except ConnectionRefusedError:
            self.reached = True  # the host answered: only the port is not open yet
        except OSError as exc:
            self.error = exc.strerror or str(exc) or type(exc).__name__
        return self.ok

    def unreachable(self) -> bool:
        return not self.reached


def _answers(host: str, port: int, banner: bool) -> bool:
    """A connection to ``host:port`` stays open (and, with ``banner``, an SSH banner arrives);
    OSError when none opened.

    Through a user-mode network's forwarded port QEMU itself accepts the
    connection and closes it when nothing listens in the guest: an immediate
    end of stream means "not yet"; silence means a server that waits for us.
    """
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.settimeout(3 if banner else 0.3)
        try:
            first = sock.recv(8)
        except TimeoutError:
            return not banner
        except OSError:
            return False  # reset by the peer: reached, not ready
        return first.startswith(b"SSH-") if banner else first != b""
