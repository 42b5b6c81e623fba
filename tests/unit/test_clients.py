"""pytest-testinfra's and fabric's connections across reverts (clients.py), without a guest:
the real libraries, with connections that were never opened to anything but a socketpair.
The real-guest tests are in tests/integration/test_debian.py."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from testinfra.host import Host

from pytest_kvmsnap.clients import FabricConnections, drop_testinfra_connections, make_testinfra_host


class Transport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


class Client:
    """Stands for a connected paramiko client; records whether it was closed."""

    def __init__(self, sock: socket.socket) -> None:
        self.transport, self.closed = Transport(sock), False

    def get_transport(self) -> Transport:
        return self.transport

    def close(self) -> None:
        self.closed = True


class StubGuest:
    name, generation = "g", 0

    def address(self, port: int = 22) -> tuple[str, int]:
        return "127.0.0.1", 2222


@pytest.fixture
def testinfra_cache() -> Iterator[None]:
    saved = dict(Host._host_cache), dict(Host._hosts_cache)
    yield
    Host._host_cache.clear()
    Host._host_cache.update(saved[0])
    Host._hosts_cache.clear()
    Host._hosts_cache.update(saved[1])


def test_a_revert_drops_every_cached_testinfra_connection_without_a_word(testinfra_cache: None) -> None:
    host: Any = make_testinfra_host(StubGuest(), "root", "/keys/id", 30.0)
    assert host.backend.NAME == "paramiko" and host.backend.host.port == "2222"
    ours, theirs = socket.socketpair()
    client = Client(ours)
    host.backend.__dict__["client"] = client  # what its functools.cached_property holds once connected
    assert drop_testinfra_connections() == 1
    assert "client" not in host.backend.__dict__, "testinfra would reuse the rewound connection"
    assert client.closed and ours.fileno() == -1, "the socket is closed before the client says goodbye"
    theirs.settimeout(1)
    assert theirs.recv(1) == b"", "something was sent over the rewound connection"
    theirs.close()
    assert drop_testinfra_connections() == 0, "nothing left to drop"


def test_a_fabric_connection_is_made_anew_after_a_revert() -> None:
    guest = StubGuest()
    connections = FabricConnections("root", "/keys/id", 30.0)
    first = connections.get(guest)
    assert (first.host, first.port, first.user) == ("127.0.0.1", 2222, "root")
    assert first.connect_kwargs["key_filename"] == ["/keys/id"]
    assert first.config.run.in_stream is False, "fabric would read pytest's stdin and fail"
    assert connections.get(guest) is first
    guest.generation = 1
    assert connections.get(guest) is not first
    connections.close()
