"""The :class:`~pytest_kvmsnap.engine.Engine` over libvirt: QEMU/KVM guests, local or remote.

Thin on purpose: each method is one of the package's helpers (``snapshots``,
``qemu``, ``agent``, ``network``, ``evidence``, ``preflight``, ``clones``,
``storage``, ``leases``), which hold the libvirt knowledge and its tests.
This module only fits them to the interface: libvirt objects stay in here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, cast

from pytest_kvmsnap.engine import Capabilities, Clones, LeaseHandle, Leases, Machine, Snapshot
from pytest_kvmsnap.libvirt import agent, clones, connection, evidence, leases, preflight, qemu, snapshots
from pytest_kvmsnap.libvirt import network as ports  # 'network' names a user-mode network below
from pytest_kvmsnap.ownership import LeaseRecord, Owner
from pytest_kvmsnap.records import CloneSource

if TYPE_CHECKING:
    import libvirt


class LibvirtSnapshot:
    def __init__(self, snap: libvirt.virDomainSnapshot) -> None:
        self.native = snap

    @property
    def name(self) -> str:
        return str(self.native.getName())

    def description(self) -> str:
        return snapshots.snapshot_description(self.native)

    def state(self) -> str:
        return snapshots.snapshot_state(self.native)


class LibvirtLease:
    def __init__(self, dom: libvirt.virDomain) -> None:
        self.native = dom

    @property
    def id(self) -> str:
        return str(self.native.UUIDString())


def _snap(snapshot: Snapshot) -> libvirt.virDomainSnapshot:
    return cast(LibvirtSnapshot, snapshot).native


def _lease(handle: LeaseHandle) -> libvirt.virDomain:
    return cast(LibvirtLease, handle).native


def _wrapped(snap: libvirt.virDomainSnapshot | None) -> LibvirtSnapshot | None:
    return None if snap is None else LibvirtSnapshot(snap)


class LibvirtMachine:
    def __init__(self, dom: libvirt.virDomain) -> None:
        self.native = dom

    @property
    def name(self) -> str:
        return str(self.native.name())

    def snapshot(self, name: str) -> Snapshot:
        return LibvirtSnapshot(snapshots.lookup_snapshot(self.native, name))

    def find_snapshot(self, name: str) -> Snapshot | None:
        return _wrapped(snapshots.find_snapshot(self.native, name))

    def snapshots(self) -> list[Snapshot]:
        return [LibvirtSnapshot(snap) for snap in self.native.listAllSnapshots()]

    def take_baseline(self, name: str, owner: Owner) -> Snapshot:
        return LibvirtSnapshot(snapshots.create_baseline(self.native, name, owner))

    def save_state(self, name: str, description: str) -> None:
        snapshots.create_kept(self.native, name, description)

    def redescribe(self, snapshot: Snapshot, description: str) -> None:
        snapshots.redescribe(_snap(snapshot), description)

    def delete_snapshot(self, snapshot: Snapshot) -> None:
        snapshots.delete_snapshot(_snap(snapshot))

    def holds_memory(self, snapshot: str) -> bool:
        return snapshots.qemu_holds_vm_state(self.native, snapshot)

    def resume_if_paused_by_snapshot(self) -> None:
        snapshots.resume_if_paused_by_snapshot(self.native)

    def hot_revert_problem(self, snapshot: str) -> str | None:
        return qemu.inplace_possible(self.native.connect(), snapshot)

    def revert_hot(self, snapshot: str) -> None:
        qemu.revert_inplace(self.native, snapshot)

    def revert_cold(self, snapshot: Snapshot) -> None:
        qemu.revert_libvirt(self.native, _snap(snapshot))

    def process_identity(self) -> tuple[int, str] | None:
        return qemu.process_identity(self.native)

    def is_running(self) -> bool:
        return bool(self.native.isActive())

    def crash_reason(self) -> str | None:
        return qemu.crash_reason(self.native)

    def wait_until_down(self, seconds: float) -> bool:
        return qemu.wait_until_down(self.native, seconds)

    def has_agent(self) -> bool:
        return agent.has_agent_channel(self.native)

    def agent_answers(self, timeout: int = 2) -> bool:
        return agent.agent_answers(self.native, timeout)

    def sync_clock(self) -> None:
        agent.sync_clock(self.native)

    def reseed(self) -> str | None:
        return agent.reseed(self.native)

    def console_log(self) -> str | None:
        return evidence.console_log(self.native)

    def has_screen(self) -> bool:
        return evidence.has_screen(self.native)

    def screenshot(self) -> tuple[str, bytes]:
        return evidence.screenshot(self.native)

    def user_network(self) -> str | None:
        return ports.user_netdev(self.native)

    def forward_port(self, network: str, guest_port: int) -> int:
        return ports.forward_port(self.native, network, guest_port)

    def host_forwards(self) -> dict[int, tuple[str, int]]:
        return ports.host_forwards(self.native)

    def remove_forward(self, network: str, host_port: int) -> None:
        qemu.hmp(self.native, f"hostfwd_remove {network} tcp:127.0.0.1:{int(host_port)}")

    def ipv4(self) -> str | None:
        return ports.guest_ipv4(self.native)


def _dom(machine: Machine) -> libvirt.virDomain:
    return cast(LibvirtMachine, machine).native


class LibvirtEngine:
    def __init__(self, uri: str, conn: libvirt.virConnect) -> None:
        self._uri = uri
        self.native = conn
        self._leases, self._clones = LibvirtLeases(conn), LibvirtClones(conn)

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def leases(self) -> Leases:
        return self._leases

    @property
    def clones(self) -> Clones:
        return self._clones

    def capabilities(self) -> Capabilities:
        # The in-place revert and port forwarding go through QEMU's monitor; other
        # libvirt drivers (test:///, Xen) have none and fall back per guest.
        qemu = str(self.native.getType()).upper().startswith("QEMU")
        return Capabilities(hot_revert=qemu, memory=True, clones=True, leases=True, agent=qemu,
                            screenshot=True, port_forward=qemu)

    def is_alive(self) -> bool:
        return connection.is_alive(self.native)

    def hostname(self) -> str:
        return str(self.native.getHostname())

    def is_this_host(self) -> bool:
        return connection.is_this_host(self.native)

    def machine(self, name: str, *, checked: bool = True) -> Machine:
        dom = connection.lookup_domain(self.native, name)
        if checked:
            preflight.preflight(self.native, dom)
        return LibvirtMachine(dom)

    def guest_names(self) -> list[str]:
        return [str(dom.name()) for dom in self.native.listAllDomains()]

    def close(self) -> None:
        self.native.close()


class LibvirtClones:
    """Clones through libvirt's storage API and transient domains (clones.py, storage.py)."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn

    def check_copyable(self, machine: Machine) -> None:
        clones.check_copyable(_dom(machine))

    def make_source(self, machine: Machine, baseline: Snapshot, owner: Owner) -> CloneSource:
        return clones.make_source(_dom(machine), _snap(baseline), owner)

    def make_clone(self, source: CloneSource, original: str, name: str, owner: Owner) -> tuple[Machine, Snapshot]:
        dom, snap = clones.make_clone(self.conn, source, original, name, owner)
        return LibvirtMachine(dom), LibvirtSnapshot(snap)

    def destroy(self, name: str) -> None:
        clones.destroy(self.conn, name)

    def keep(self, name: str, snapshots: list[str], record: dict[str, object]) -> str:
        return clones.keep(self.conn, name, snapshots, record)

    def remove_source(self, source: CloneSource) -> None:
        clones.remove_source(self.conn, source)

    def orphans(self, machine: Machine, dead: Callable[[Owner], bool],
                dead_runs: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
        return clones.orphans(self.conn, _dom(machine), dead, dead_runs)

    def remove_pool(self, name: str) -> None:
        clones.remove_own_pool(self.conn, name)


class LibvirtLeases:
    """Leases as inert domains (leases.py)."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn

    def read(self, guest: str) -> tuple[LeaseHandle, LeaseRecord] | None:
        found = leases.read(self.conn, guest)
        return None if found is None else (LibvirtLease(found[0]), found[1])

    def reread(self, handle: LeaseHandle) -> LeaseRecord | None:
        return leases.reread(_lease(handle))

    def by_id(self, lease_id: str) -> LeaseHandle | None:
        dom = leases.by_uuid(self.conn, lease_id)
        return None if dom is None else LibvirtLease(dom)

    def define(self, record: LeaseRecord) -> LeaseHandle:
        return LibvirtLease(leases.define(self.conn, record))

    def take_over(self, expired: LeaseHandle, record: LeaseRecord) -> LeaseHandle:
        return LibvirtLease(leases.take_over(self.conn, _lease(expired), record))

    def renew(self, handle: LeaseHandle, record: LeaseRecord) -> bool:
        return leases.renew(_lease(handle), record)

    def release(self, handle: LeaseHandle) -> None:
        leases.release(_lease(handle))

    def all(self) -> list[tuple[LeaseHandle, LeaseRecord]]:
        return [(LibvirtLease(dom), record) for dom, record in leases.all_leases(self.conn)]

    def is_lease(self, guest: str) -> bool:
        return leases.is_lease_name(guest)


class LibvirtKind:
    """Engines over libvirt, one per URI."""

    @property
    def refusal(self) -> type[Exception]:
        return cast(type[Exception], connection.lib().libvirtError)

    def open(self, uri: str) -> LibvirtEngine:
        return LibvirtEngine(uri, connection.open_connection(uri))

    def errors(self, uri: str, action: str) -> AbstractContextManager[None]:
        return connection.libvirt_errors(uri, action)

    def agent_unavailable(self, exc: Exception) -> bool:
        return agent.is_agent_unavailable(exc)


LIBVIRT = LibvirtKind()

