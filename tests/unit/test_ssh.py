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
                                        "the guest is down, unreachable from here, or nothing listens"):
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
