"""Engines (connections to hypervisors), the guests looked up through them, and reconnects.

A connection does not survive a restart of its service (libvirtd), but the guests' QEMU
processes do: a lost connection is noticed (one cheap round trip), a new one
is opened once the daemon answers again, and a step that lost its connection
mid-way is run once more.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.engine import Engine, EngineKind, Machine
from pytest_kvmsnap.events import Notice, Reporter, Waiting
from pytest_kvmsnap.exceptions import ConnectionFailed, ConnectionLost
from pytest_kvmsnap.libvirt.engine import LIBVIRT

T = TypeVar("T")
RECONNECT_TIMEOUT = 30.0  # seconds to wait for a restarted service (libvirtd) to answer again
RECONNECT_POLL = 0.5


def open_within(kind: EngineKind, uri: str, seconds: float) -> Engine:
    """``kind.open(uri)``, or :class:`ConnectionFailed` once ``seconds`` passed without an answer.

    A host that is down or drops packets leaves TCP and SSH waiting for minutes,
    and libvirt's keepalive starts only once a connection is open.  The attempt
    goes on in a thread of its own; what it opens after the caller gave up, it closes.
    """
    lock = threading.Lock()
    opened: list[Engine] = []
    failed: list[BaseException] = []
    gave_up = False

    def attempt() -> None:
        try:
            engine = kind.open(uri)
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)
            return
        with lock:
            if not gave_up:
                opened.append(engine)
                return
        with contextlib.suppress(Exception):  # too late: nobody will use it
            engine.close()

    thread = threading.Thread(target=attempt, name=f"kvmsnap-connect {uri}", daemon=True)
    thread.start()
    thread.join(seconds)
    with lock:
        if failed:
            raise failed[0]
        if opened:
            return opened[0]
        gave_up = True
    raise ConnectionFailed(f"the hypervisor at {uri} did not answer within {seconds:g} s (a host that is down, or a "
                           "network or daemon that drops the connection): check that host, or raise "
                           "--kvm-connect-timeout")


class Hypervisor:
    def __init__(self, settings: Settings, report: Reporter,
                 on_reconnect: Callable[[str], None] = lambda _text: None, kind: EngineKind | None = None) -> None:
        self.settings = settings
        self.report = report
        self.on_reconnect = on_reconnect  # told once per reconnect: the coordinator records it
        # Which engine the URIs name: libvirt unless told (the one place that default is made).
        self.kind: EngineKind = kind or LIBVIRT
        self._engines: dict[str, Engine] = {}
        self._machines: dict[tuple[str, str], Machine] = {}

    def engine(self, uri: str | None = None) -> Engine:
        uri = uri or self.settings.uri
        if uri not in self._engines:
            self._engines[uri] = self.open_separate(uri)
        return self._engines[uri]

    def open_separate(self, uri: str) -> Engine:
        """A new connection to ``uri``, not cached here (another thread's own, say)."""
        return open_within(self.kind, uri, self.settings.connect_timeout)

    def machine(self, name: str, uri: str | None = None) -> Machine:
        """Look the guest up and check it once, before any snapshot is taken."""
        uri = uri or self.settings.uri
        engine = self.engine(uri)  # first: a reconnect drops the cached guests
        if (uri, name) not in self._machines:
            machine = engine.machine(name)
            if self.settings.snapshot:
                machine.snapshot(self.settings.snapshot)
            self._machines[uri, name] = machine
        return self._machines[uri, name]

    def errors(self, uri: str, action: str) -> AbstractContextManager[None]:
        """The engine's failures inside as the plugin's one-line errors (see EngineKind.errors)."""
        return self.kind.errors(uri, action)

    def reconnect_if_lost(self) -> None:
        for uri, engine in list(self._engines.items()):
            if not engine.is_alive():
                self.reconnect(uri)

    def reconnect(self, uri: str) -> None:
        """Drop the connection to ``uri`` and open a new one, waiting for its service to answer."""
        self._drop(uri)
        deadline = time.monotonic() + RECONNECT_TIMEOUT
        while True:
            try:
                self.engine(uri)
                break
            except ConnectionFailed as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionFailed(f"the connection to {uri} was lost and {self.kind.service} did not "
                                           f"answer again within {RECONNECT_TIMEOUT:.0f} s: {exc}") from None
                self.report(Waiting(f"kvmsnap: waiting for {self.kind.service} at {uri} to answer again"))
                time.sleep(RECONNECT_POLL)
        self.on_reconnect(f"kvmsnap: reconnected to {uri}: the connection was lost ({self.kind.service} restarted?)")

    def retrying(self, action: str, step: Callable[[], T], uri: str | None = None) -> T:
        """Run ``step``; if the connection dropped, reconnect and run it once more.

        ``step`` must be safe to run again and look up what it needs afresh:
        objects from the lost connection are dead.
        """
        uri = uri or self.settings.uri
        try:
            with self.errors(uri, action):
                return step()
        except ConnectionLost as exc:
            self.report(Notice(f"kvmsnap: {exc}; reconnecting and trying once more"))
        self.reconnect(uri)
        with self.errors(uri, action):
            return step()

    def _drop(self, uri: str) -> None:
        with contextlib.suppress(Exception):  # already broken; nothing to release
            self._engines.pop(uri).close()
        for key in [key for key in self._machines if key[0] == uri]:
            del self._machines[key]

    def close(self) -> None:
        for engine in self._engines.values():
            with contextlib.suppress(Exception):  # the daemon may be gone; nothing to release
                engine.close()
        self._engines.clear()
        self._machines.clear()
