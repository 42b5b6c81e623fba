"""kvm_ssh's client without a guest: every step bounded, and a failure that names its part.

Loopback only: a closed port (the guest or its port is not there) and a socket
that accepts and never answers (sshd not answering).  Credentials, reverts and
files are tested against a real sshd on the Debian guest (test_debian.py).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from pytest_kvmsnap.guestside import settle_command
from pytest_kvmsnap.ssh import GuestSSH, SSHFailed


class FakeGuest:
    def __init__(self, port: int) -> None:
        self.name, self.generation, self.port = "g", 0, port

    def address(self, port: int = 22) -> tuple[str, int]:
        return "127.0.0.1", self.port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word (an sshd that hangs)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield int(server.getsockname()[1])


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_nothing_listening_blames_the_guest_at_once() -> None:
    ssh = GuestSSH(FakeGuest(closed_port()), timeout=5)
    start = time.monotonic()
    with pytest.raises(SSHFailed, match=r"ssh root@127.0.0.1:\d+ \(guest 'g'\): no connection within 5 s .*"
                                        "the guest is down, unreachable from here, or nothing listens on its "
                                        "port; if the address is wrong, name the right one with --kvm-address"):
        ssh.run("true")
    assert time.monotonic() - start < 2


def test_an_sshd_that_never_answers_is_bounded_and_named(silent_port: int) -> None:
    ssh = GuestSSH(FakeGuest(silent_port), timeout=1)
    start = time.monotonic()
    with pytest.raises(SSHFailed, match="the connection opened but sshd did not complete the handshake within 1 s"):
        ssh.run("true")
    assert time.monotonic() - start < 5


def test_each_generation_connects_afresh_and_close_is_idempotent(silent_port: int) -> None:
    """A new generation (a revert): the next step connects again, bounded each time."""
    guest = FakeGuest(silent_port)
    ssh = GuestSSH(guest, timeout=0.5)
    for generation in (0, 1):
        guest.generation = generation
        with pytest.raises(SSHFailed, match="did not complete the handshake"):
            ssh.run("true")
    ssh.close()
    ssh.close()  # closing twice is fine


class Stream:
    """One side of a fake SSH session: what the command printed, or what was written to it."""

    def __init__(self, text: str = "", status: int = 0) -> None:
        self.lines, self.written, self.closed = text.splitlines(keepends=True), "", False
        self.channel = self
        self.status = status

    def readline(self) -> str:
        return self.lines.pop(0) if self.lines else ""

    def read(self) -> bytes:
        return "".join(self.lines).encode()

    def write(self, text: str) -> None:
        self.written += text

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def recv_exit_status(self) -> int:
        return self.status


class Session:
    def __init__(self, out: str, err: str, status: int) -> None:
        self.stdin, self.out, self.err, self.commands = Stream(), Stream(out, status), Stream(err), list[str]()

    def exec_command(self, command: str, timeout: float) -> tuple[Stream, Stream, Stream]:
        self.commands.append(command)
        return self.stdin, self.out, self.err


def connected(user: str, session: Session) -> GuestSSH:
    ssh = GuestSSH(FakeGuest(22), user=user)
    ssh._client, ssh._generation = session, 0  # as if connected after the revert
    ssh._where = f"ssh {user}@127.0.0.1:22 (guest 'g')"
    return ssh


def test_settle_sends_the_time_when_the_guest_asks_for_it() -> None:
    session = Session("ready\n", "", 0)
    assert connected("root", session).settle(clock=True, reseed=True) is None
    assert session.commands[0] == settle_command(True, True)  # perl in place of the shell, else sh
    sent, entropy = session.stdin.written.split()
    assert abs(float(sent) - time.time()) < 5 and len(entropy) == 128 and session.stdin.closed


def test_settle_as_another_user_goes_through_sudo_and_says_why_it_did_not_start() -> None:
    session = Session("", "sudo: a password is required\n", 1)
    with pytest.raises(SSHFailed, match=r"\(guest 'g'\): sudo did not start the settle script \(exit 1\): "
                                        "sudo: a password is required"):
        connected("tester", session).settle(clock=True, reseed=False)
    assert session.commands[0].startswith("sudo -n sh -c ") and session.stdin.written == ""


def test_settle_names_the_step_that_failed() -> None:
    session = Session("ready\n", "date: cannot set date: Operation not permitted\n", 10)
    with pytest.raises(SSHFailed, match="setting the clock failed \\(exit 10\\): date: cannot set date"):
        connected("root", session).settle(clock=True, reseed=True)
    assert connected("root", Session("ready\n", "", 12)).settle(clock=True, reseed=True) == (
        "no perl in the guest to force a reseed; fresh bytes were mixed in without it")
