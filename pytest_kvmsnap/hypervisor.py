"""Connections to libvirt, the domains looked up through them, and reconnects.

A connection does not survive a libvirtd restart, but the guests' QEMU
processes do: a lost connection is noticed (one cheap round trip), a new one
is opened once the daemon answers again, and a step that lost its connection
mid-way is run once more.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from pytest_kvmsnap import backend
from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.events import Notice, Reporter, Waiting
from pytest_kvmsnap.exceptions import ConnectionFailed, ConnectionLost

if TYPE_CHECKING:
    import libvirt

T = TypeVar("T")
RECONNECT_TIMEOUT = 30.0  # seconds to wait for a restarted libvirtd to answer again
RECONNECT_POLL = 0.5


class Hypervisor:
    def __init__(self, settings: Settings, report: Reporter,
                 on_reconnect: Callable[[str], None] = lambda _text: None) -> None:
        self.settings = settings
        self.report = report
        self.on_reconnect = on_reconnect  # told once per reconnect: the coordinator records it
        self._connections: dict[str, libvirt.virConnect] = {}
        self._domains: dict[tuple[str, str], libvirt.virDomain] = {}

    def connection(self, uri: str | None = None) -> libvirt.virConnect:
        uri = uri or self.settings.uri
        if uri not in self._connections:
            self._connections[uri] = backend.open_connection(uri)
        return self._connections[uri]

    def domain(self, name: str, uri: str | None = None) -> libvirt.virDomain:
        """Look the domain up and preflight it once, before any snapshot is taken."""
        uri = uri or self.settings.uri
        conn = self.connection(uri)  # first: a reconnect drops the cached domains
        if (uri, name) not in self._domains:
            dom = backend.lookup_domain(conn, name)
            backend.preflight(conn, dom)
            if self.settings.snapshot:
                backend.lookup_snapshot(dom, self.settings.snapshot)
            self._domains[uri, name] = dom
        return self._domains[uri, name]

    def reconnect_if_lost(self) -> None:
        for uri, conn in list(self._connections.items()):
            if not backend.is_alive(conn):
                self.reconnect(uri)

    def reconnect(self, uri: str) -> None:
        """Drop the connection to ``uri`` and open a new one, waiting for libvirtd to answer."""
        self._drop(uri)
        deadline = time.monotonic() + RECONNECT_TIMEOUT
        while True:
            try:
                self.connection(uri)
                break
            except ConnectionFailed as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionFailed(f"the libvirt connection to {uri} was lost and libvirtd did not "
                                           f"answer again within {RECONNECT_TIMEOUT:.0f} s: {exc}") from None
                self.report(Waiting(f"kvmsnap: waiting for libvirtd at {uri} to answer again"))
                time.sleep(RECONNECT_POLL)
        self.on_reconnect(f"kvmsnap: reconnected to {uri}: the libvirt connection was lost (libvirtd restarted?)")

    def retrying(self, action: str, step: Callable[[], T], uri: str | None = None) -> T:
        """Run ``step``; if libvirtd dropped the connection, reconnect and run it once more.

        ``step`` must be safe to run again and look up what it needs afresh:
        objects from the lost connection are dead.
        """
        uri = uri or self.settings.uri
        try:
            with backend.libvirt_errors(uri, action):
                return step()
        except ConnectionLost as exc:
            self.report(Notice(f"kvmsnap: {exc}; reconnecting and trying once more"))
        self.reconnect(uri)
        with backend.libvirt_errors(uri, action):
            return step()

    def _drop(self, uri: str) -> None:
        with contextlib.suppress(Exception):  # already broken; nothing to release
            self._connections.pop(uri).close()
        for key in [key for key in self._domains if key[0] == uri]:
            del self._domains[key]

    def close(self) -> None:
        for conn in self._connections.values():
            with contextlib.suppress(Exception):  # the daemon may be gone; nothing to release
                conn.close()
        self._connections.clear()
        self._domains.clear()
