"""A second engine, in memory: what a hypervisor must do for the plugin, and nothing else.

Like pytest-xdist's schedulers tested against a fake node, the coordinator's
decisions are tested here against an engine whose guests are Python objects:
a guest's *disk* is a dict the test writes to, a snapshot copies it, a hot
revert needs the same VM process that took or loaded the snapshot, a cold revert
starts a new one, a lease is a compare-and-swap record.  It implements
``engine.Engine`` in full (mypy checks it), so it also shows that the interface
is enough for an engine that is not libvirt.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pytest_kvmsnap.engine import Capabilities, Clones, Engine, LeaseHandle, Leases, Machine, Snapshot
from pytest_kvmsnap.exceptions import (
    ConnectionFailed,
    ConnectionLost,
    DomainNotFound,
    KvmSnapError,
    RevertFailed,
    SnapshotNotFound,
)
from pytest_kvmsnap.guestside import RESIDENT_PERL, RESIDENT_QUIT_PERL
from pytest_kvmsnap.ownership import LeaseRecord, Owner, Taken, owner_description
from pytest_kvmsnap.records import CloneSource

PROVIDED: FakeKind | None = None  # what an inner run's conftest returns from pytest_kvmsnap_engine

FULL = Capabilities(hot_revert=True, memory=True, clones=True, leases=True, agent=True, screenshot=True,
                    port_forward=True)


class Refused(Exception):
    """What the fake engine's API raises when it refuses a request."""


class Dropped(Refused):
    """The connection dropped under a request."""


@dataclass
class FakeSnapshot:
    name: str
    text: str
    saved_state: str
    disk: dict[str, str]
    process: int  # the VM process that took it

    def description(self) -> str:
        return self.text

    def state(self) -> str:
        return self.saved_state

    def identity(self) -> str:
        return f"{self.name}@{id(self)}"


@dataclass
class FakeLease:
    id: str


@dataclass
class FakeMachine:
    name: str
    disk: dict[str, str] = field(default_factory=dict)  # what tests change in the guest
    process: int = 1  # the VM process's id: a cold revert starts a new one
    running: bool = True
    crashed: str | None = None
    saved: dict[str, FakeSnapshot] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)  # what the plugin did to it, in order
    fail_hot: bool = False  # the next hot revert fails (a refused loadvm)
    loaded: dict[str, int] = field(default_factory=dict)  # snapshot -> the VM process a cold revert started from it
    perl: bool = False  # it has an agent that runs perl: the resident settle process lives in ``disk``

    @property
    def native(self) -> Any:
        return self

    def snapshot(self, name: str) -> Snapshot:
        if name not in self.saved:
            raise SnapshotNotFound(name, self.name, list(self.saved))
        return self.saved[name]

    def find_snapshot(self, name: str) -> Snapshot | None:
        return self.saved.get(name)

    def snapshots(self) -> list[Snapshot]:
        return list(self.saved.values())

    def take_baseline(self, name: str, owner: Owner) -> Snapshot:
        self.log.append(f"take {name}")
        self.saved[name] = FakeSnapshot(name, owner_description(owner), "running" if self.running else "shutoff",
                                        dict(self.disk), self.process)
        return self.saved[name]

    def save_state(self, name: str, description: str) -> None:
        self.log.append(f"keep {name}")
        self.saved[name] = FakeSnapshot(name, description, "running", dict(self.disk), self.process)

    def redescribe(self, snapshot: Snapshot, description: str) -> None:
        self.saved[snapshot.name].text = description

    def delete_snapshot(self, snapshot: Snapshot) -> None:
        self.log.append(f"delete {snapshot.name}")
        del self.saved[snapshot.name]

    def holds_memory(self, snapshot: str) -> bool:
        return True

    def resume_if_paused_by_snapshot(self) -> None:
        pass

    def hot_revert_problem(self, snapshot: str) -> str | None:
        return None

    def revert_hot(self, snapshot: str) -> None:
        saved = self.saved[snapshot]
        if self.fail_hot:
            self.fail_hot = False
            raise RevertFailed(f"in-place load of {snapshot!r} failed: refused")
        # What makes an in-place load unsafe on a real hypervisor: a process that never held it.
        assert self.running and self.process in (saved.process, self.loaded.get(snapshot)), \
            "a hot revert into a VM process that never held the snapshot"
        self.log.append(f"hot {snapshot}")
        self.disk = dict(saved.disk)

    def revert_cold(self, snapshot: Snapshot) -> None:
        self.log.append(f"cold {snapshot.name}")
        self.process += 1
        self.running, self.crashed = True, None
        self.disk = dict(self.saved[snapshot.name].disk)
        self.loaded[snapshot.name] = self.process

    def process_identity(self) -> tuple[int, str] | None:
        return (self.process, "devices") if self.running else None

    def is_running(self) -> bool:
        return self.running

    def crash_reason(self) -> str | None:
        return self.crashed

    def wait_until_down(self, seconds: float) -> bool:
        return not self.running

    def crash(self) -> None:
        """The VM process dies under the guest."""
        self.running, self.crashed = False, "its VM process exited unexpectedly"

    def has_agent(self) -> bool:
        return self.perl

    def agent_answers(self, timeout: int = 2) -> bool:
        return self.perl

    def refresh(self, clock: bool, reseed: bool) -> str | None:
        if not self.perl:
            raise Refused("no agent")
        self.log.append("refresh")
        return None

    def clock_set(self) -> None:
        pass

    def run_program(self, path: str, args: list[str], stdin: str) -> tuple[int, str]:
        """Only the resident settle process's start and quit, kept in the guest's ``disk`` (so its
        snapshots hold it, as a real guest's memory does)."""
        if not self.perl:
            raise KvmSnapError("no agent")
        self.log.append(f"run {args[1][:20]}")
        if args[1] == RESIDENT_PERL:
            self.disk["resident"] = stdin.strip()
            return 0, "40000 77\n"
        if args[1] == RESIDENT_QUIT_PERL and self.disk.get("resident") == stdin.split()[0]:
            del self.disk["resident"]
            return 0, ""
        return 1, ""

    def console_log(self) -> str | None:
        return None

    def has_screen(self) -> bool:
        return False

    def screenshot(self) -> tuple[str, bytes]:
        raise Refused("no screen")

    def user_network(self) -> str | None:
        return None

    def forward_port(self, network: str, guest_port: int) -> int:
        raise Refused("no user network")

    def host_forwards(self) -> dict[int, tuple[str, int]]:
        return {}

    def remove_forward(self, network: str, host_port: int) -> None:
        raise Refused("no user network")

    def ipv4(self) -> str | None:
        # None: a fake guest has no address, so no unit test can send traffic to one (a
        # kvm_ssh settle once tried 192.0.2.10); an address of the user's is --kvm-address.
        return None


class FakeEngine:
    """One fake hypervisor; its state outlives connections (``FakeKind`` keeps it)."""

    def __init__(self, uri: str, host: FakeHost) -> None:
        self._uri = uri
        self.host = host

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def native(self) -> Any:
        return self.host

    @property
    def leases(self) -> Leases:
        return FakeLeases(self.host)

    @property
    def clones(self) -> Clones:
        return NoClones()

    def capabilities(self) -> Capabilities:
        return self.host.capabilities

    def is_alive(self) -> bool:
        return not self.host.dropped

    def hostname(self) -> str:
        return "fakehost"

    def is_this_host(self) -> bool:
        return True

    def machine(self, name: str, *, checked: bool = True) -> Machine:
        if name not in self.host.machines:
            raise DomainNotFound(name, self.uri, list(self.host.machines))
        return self.host.machines[name]

    def guest_names(self) -> list[str]:
        return [*self.host.machines, *(lease + ".lease" for lease in self.host.leases)]

    def close(self) -> None:
        pass


class NoClones:
    """An engine without clones (its capabilities say so): it finds no orphans and makes none."""

    def check_copyable(self, machine: Machine) -> None:
        raise Refused("the fake engine makes no clones")

    def make_source(self, machine: Machine, baseline: Snapshot, owner: Owner) -> CloneSource:
        raise Refused("the fake engine makes no clones")

    def make_clone(self, source: CloneSource, original: str, name: str, owner: Owner) -> tuple[Machine, Snapshot]:
        raise Refused("the fake engine makes no clones")

    def destroy(self, name: str) -> None:
        pass

    def keep(self, name: str, snapshots: list[str], record: dict[str, object]) -> str:
        raise Refused("the fake engine makes no clones")

    def remove_source(self, source: CloneSource) -> None:
        pass

    def orphans(self, machine: Machine, dead: Callable[[Owner], bool],
                dead_runs: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
        return [], []

    def remove_pool(self, name: str) -> None:
        pass


class FakeLeases:
    """A dict of guest -> (id, record) on the fake host; every write a compare-and-swap on the id."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host

    def read(self, guest: str) -> tuple[LeaseHandle, LeaseRecord] | None:
        found = self.host.leases.get(guest)
        return None if found is None else (FakeLease(found[0]), found[1])

    def reread(self, handle: LeaseHandle) -> LeaseRecord | None:
        return next((record for lease_id, record in self.host.leases.values() if lease_id == handle.id), None)

    def by_id(self, lease_id: str) -> LeaseHandle | None:
        return FakeLease(lease_id) if any(found[0] == lease_id for found in self.host.leases.values()) else None

    def define(self, record: LeaseRecord) -> LeaseHandle:
        if record.guest in self.host.leases:
            raise Taken(f"a lease on {record.guest} exists")
        lease_id = f"lease-{next(self.host.ids)}"
        self.host.leases[record.guest] = (lease_id, record)
        return FakeLease(lease_id)

    def take_over(self, expired: LeaseHandle, record: LeaseRecord) -> LeaseHandle:
        found = self.host.leases.get(record.guest)
        if found is None or found[0] != expired.id:
            raise Taken("someone else took it over first")
        del self.host.leases[record.guest]
        return self.define(record)

    def renew(self, handle: LeaseHandle, record: LeaseRecord) -> bool:
        found = self.host.leases.get(record.guest)
        if found is None or found[0] != handle.id:
            return False
        self.host.leases[record.guest] = (handle.id, record)
        return True

    def release(self, handle: LeaseHandle) -> None:
        for guest, (lease_id, _record) in list(self.host.leases.items()):
            if lease_id == handle.id:
                del self.host.leases[guest]

    def all(self) -> list[tuple[LeaseHandle, LeaseRecord]]:
        return [(FakeLease(lease_id), record) for lease_id, record in self.host.leases.values()]

    def is_lease(self, guest: str) -> bool:
        return guest.endswith(".lease")


@dataclass
class FakeHost:
    """What one fake hypervisor holds."""

    machines: dict[str, FakeMachine] = field(default_factory=dict)
    leases: dict[str, tuple[str, LeaseRecord]] = field(default_factory=dict)
    capabilities: Capabilities = FULL
    dropped: bool = False  # the connection is gone (a restarted daemon)
    ids: Iterator[int] = field(default_factory=itertools.count)

    def add(self, name: str, **disk: str) -> FakeMachine:
        self.machines[name] = FakeMachine(name, dict(disk))
        return self.machines[name]


class FakeAdvice:
    """The fake hypervisor's tool, ``fakectl``: proves that messages take their commands from the engine."""

    def revert(self, uri: str, guest: str, snapshot: str) -> str:
        return f"fakectl {uri} revert {guest} {snapshot}"

    def delete_snapshot(self, uri: str, guest: str, snapshot: str) -> str:
        return f"fakectl {uri} delete {guest} {snapshot}"

    def remove_guest(self, uri: str, guest: str, pool: str) -> str:
        return f"fakectl {uri} remove {guest} {pool}"

    def save_state(self, guest: str) -> str:
        return f"fakectl save {guest} NAME"


class FakeKind:
    """``EngineKind`` of the fake engine: URIs ``fake://<host>`` name hosts in ``hosts``."""

    refusal = Refused
    service = "the fake hypervisor"
    advice = FakeAdvice()

    def __init__(self, **hosts: FakeHost) -> None:
        self.hosts = hosts
        self.opened = 0

    def open(self, uri: str) -> Engine:
        host = self.hosts.get(uri.removeprefix("fake://"))
        if host is None:
            raise ConnectionFailed(f"no fake hypervisor at {uri}")
        self.opened += 1
        host.dropped = False
        return FakeEngine(uri, host)

    @contextlib.contextmanager
    def errors(self, uri: str, action: str) -> Iterator[None]:
        try:
            yield
        except Dropped as exc:
            raise ConnectionLost(uri, action, str(exc)) from None
        except Refused as exc:
            raise KvmSnapError(f"the fake engine failed while {action}: {exc}") from None

    def agent_unavailable(self, exc: Exception) -> bool:
        return False
