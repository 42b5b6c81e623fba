"""What the plugin asks of a hypervisor engine, as plain values: the ``Engine`` interface.

Everything above this module (reverts, baselines, recovery, leases, clones,
evidence, the run's end) talks to a guest through these protocols, never to
libvirt: the ``libvirt`` package implements them today, and a second engine
(Incus, Proxmox VE, KubeVirt: ``docs/backends.md`` maps them point by point)
would implement them again.  Names, descriptions and bytes go in and out;
handles (:class:`Snapshot`, :class:`LeaseHandle`) are the engine's own objects,
passed back to it unread.

The numbers in the comments are the operations of docs/backends.md.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from pytest_kvmsnap.ownership import LeaseRecord, Owner, SetupRecord, is_damaged, kept_records
from pytest_kvmsnap.records import CloneSource


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do; the plugin refuses up front what it cannot (see :func:`refusal`)."""

    hot_revert: bool  # 4: back to a snapshot without a new VM process (~0.1 s, not seconds)
    memory: bool  # 2: snapshots keep the guest's memory (a revert resumes, it does not boot)
    clones: bool  # 10: new guests that start at the baseline, copies made by the engine
    leases: bool  # 11: an expiring claim any host can take over atomically
    agent: bool  # 7: a guest agent (clock, entropy, --kvm-wait=agent)
    screenshot: bool  # 8
    port_forward: bool  # 12: a host port forwarded to a guest port


class Snapshot(Protocol):
    """One saved state of a guest, as the engine knows it."""

    @property
    def name(self) -> str: ...

    def description(self) -> str:
        """The text the plugin wrote into it (ownership, kept marks); '' if none."""

    def state(self) -> str:
        """The guest's state it recorded: running, paused, shutoff ..."""

    def identity(self) -> str:
        """What tells it from a snapshot of the same name made later (libvirt: its creation
        time): a kept guest setup is reused only on the very base it was built on."""


class LeaseHandle(Protocol):
    """A lease as read: acting through it fails once someone else took the lease over."""

    @property
    def id(self) -> str: ...


class Machine(Protocol):
    """One guest on one engine."""

    @property
    def name(self) -> str: ...

    @property
    def native(self) -> Any:
        """The engine's own object for the guest (libvirt: ``virDomain``), for tests."""

    # 2, 3, 9: snapshots and what they say
    def snapshot(self, name: str) -> Snapshot:
        """The snapshot called ``name``; :class:`~pytest_kvmsnap.exceptions.SnapshotNotFound` if none."""

    def find_snapshot(self, name: str) -> Snapshot | None: ...

    def snapshots(self) -> list[Snapshot]: ...

    def take_baseline(self, name: str, owner: Owner) -> Snapshot:
        """Save disks and (while it runs) memory as ``name``, marked as ``owner``'s."""

    def save_state(self, name: str, description: str) -> None:
        """Save the state now as ``name`` for the user (a failed test's)."""

    def redescribe(self, snapshot: Snapshot, description: str) -> None:
        """Replace a snapshot's description (a baseline the user keeps)."""

    def delete_snapshot(self, snapshot: Snapshot) -> None: ...

    def holds_memory(self, snapshot: str) -> bool:
        """Is the snapshot complete, memory included (not cut short mid-save)?"""

    def resume_if_paused_by_snapshot(self) -> None:
        """Resume a guest a cut-off snapshot job left paused."""

    # 4, 5: reverts
    def hot_revert_problem(self, snapshot: str) -> str | None:
        """Why ``snapshot`` cannot be loaded into the running VM process; None when it can."""

    def revert_hot(self, snapshot: str) -> None:
        """Load ``snapshot`` into the running VM process; RevertFailed if it did not."""

    def revert_cold(self, snapshot: Snapshot) -> None:
        """Back to ``snapshot``, a new VM process if need be; RevertFailed if it did not."""

    def process_identity(self) -> tuple[int, str] | None:
        """Which VM process runs the guest now (and its devices); None when none does."""

    # 6: state
    def is_running(self) -> bool: ...

    def crash_reason(self) -> str | None:
        """Why the guest is down if its VM died under it; None otherwise."""

    def wait_until_down(self, seconds: float) -> bool: ...

    # 7: the guest agent
    def has_agent(self) -> bool: ...

    def agent_answers(self, timeout: int = 2) -> bool: ...

    def refresh(self, clock: bool, reseed: bool) -> str | None:
        """After a restore: set the guest's clock from the host's and/or give it fresh
        entropy (guestside.py); None, or why the reseed was only partial."""

    def clock_set(self) -> None:
        """The guest's clock was just set (by :meth:`refresh`, or over SSH): stop the hypervisor
        replaying the timer ticks the restored guest missed (QEMU: RTC reinjection)."""

    def run_program(self, path: str, args: list[str], stdin: str) -> tuple[int, str]:
        """Run ``path`` in the guest through its agent with ``stdin`` as its input, until it exits:
        its exit code and standard output.  Raises KvmSnapError where it cannot (no agent, no such
        program).  The resident settle process is started and stopped with it (resident.py)."""

    # 8: evidence
    def console_log(self) -> str | None:
        """The host file the guest's serial console is written to, if any."""

    def has_screen(self) -> bool: ...

    def screenshot(self) -> tuple[str, bytes]:
        """The screen and its MIME type."""

    # 12: reaching the guest
    def user_network(self) -> str | None:
        """The guest's user-mode (NAT inside the VM process) network, whose ports are forwarded."""

    def forward_port(self, network: str, guest_port: int) -> int:
        """A free port on this host's 127.0.0.1 forwarded to ``guest_port``."""

    def host_forwards(self) -> dict[int, tuple[str, int]]:
        """Guest port -> (host address, host port) of every forward the user-mode network has now,
        whoever made it."""

    def remove_forward(self, network: str, host_port: int) -> None: ...

    def ipv4(self) -> str | None:
        """The guest's routable IPv4 address, as the engine sees it."""


class Leases(Protocol):
    """11: leases, a compare-and-swap on a small record the hypervisor keeps."""

    def read(self, guest: str) -> tuple[LeaseHandle, LeaseRecord] | None: ...

    def reread(self, handle: LeaseHandle) -> LeaseRecord | None: ...

    def by_id(self, lease_id: str) -> LeaseHandle | None:
        """The lease with that id if it still exists (not taken over since)."""

    def define(self, record: LeaseRecord) -> LeaseHandle:
        """A new lease; :class:`~pytest_kvmsnap.ownership.Taken` if one exists already."""

    def take_over(self, expired: LeaseHandle, record: LeaseRecord) -> LeaseHandle:
        """Replace ``expired`` by a new lease; Taken if someone else did first."""

    def renew(self, handle: LeaseHandle, record: LeaseRecord) -> bool:
        """Write ``record`` through ``handle``; False if it was taken over."""

    def release(self, handle: LeaseHandle) -> None: ...

    def all(self) -> list[tuple[LeaseHandle, LeaseRecord]]: ...

    def is_lease(self, guest: str) -> bool:
        """Is guest ``name`` a lease (never a guest to test or clean)?"""


class Clones(Protocol):
    """10: clones, copies made by the engine, never by pytest."""

    def check_copyable(self, machine: Machine) -> None: ...

    def make_source(self, machine: Machine, baseline: Snapshot, owner: Owner) -> CloneSource:
        """Copy the guest's disks (``baseline`` inside) once per run, for its clones."""

    def make_clone(self, source: CloneSource, original: str, name: str, owner: Owner) -> tuple[Machine, Snapshot]:
        """Start clone ``name`` at the baseline; it and its baseline."""

    def destroy(self, name: str) -> None: ...

    def keep(self, name: str, snapshots: list[str], record: dict[str, object]) -> str:
        """Turn the clone into a guest that keeps ``snapshots`` for the user; its name."""

    def remove_source(self, source: CloneSource) -> None: ...

    def orphans(self, machine: Machine, dead: Callable[[Owner], bool],
                dead_runs: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
        """Clones dead runs left of the guest, and pools of copies; ``dead_runs``: ids of runs
        already known dead (an empty pool with no owner, named as one of theirs, is theirs)."""

    def remove_pool(self, name: str) -> None: ...


class Engine(Protocol):
    """One hypervisor, reached at ``uri``: its guests, and its leases and clones."""

    @property
    def uri(self) -> str: ...

    @property
    def native(self) -> Any:
        """The engine's own connection object (libvirt: ``virConnect``), for tests."""

    @property
    def leases(self) -> Leases: ...

    @property
    def clones(self) -> Clones:
        """An engine without clones (``capabilities().clones`` False) finds no orphans and makes none."""

    def capabilities(self) -> Capabilities: ...

    def is_alive(self) -> bool:
        """One cheap round trip: False once the connection is gone."""

    def hostname(self) -> str: ...

    def is_this_host(self) -> bool:
        """Does the hypervisor run here (its files and 127.0.0.1 are ours)?"""

    def machine(self, name: str, *, checked: bool = True) -> Machine:
        """Guest ``name``; ``checked``: refused, with the fix, unless it has what the plugin needs
        (cleanup looks at any guest)."""

    def guest_names(self) -> list[str]: ...

    def close(self) -> None: ...


class Advice(Protocol):
    """The commands a message tells a user to type, in the engine's own tool (libvirt: virsh),
    quoted for a POSIX shell: what the plugin knows how to do, said in words the user can run."""

    def revert(self, uri: str, guest: str, snapshot: str) -> str: ...

    def delete_snapshot(self, uri: str, guest: str, snapshot: str) -> str: ...

    def remove_guest(self, uri: str, guest: str, pool: str) -> str:
        """Remove a guest the plugin handed to the user (a kept clone) and its storage ``pool``."""

    def save_state(self, guest: str) -> str:
        """Save the guest's current state under a name the user picks (``NAME`` in the command)."""


class EngineKind(Protocol):
    """How to reach engines of one kind, and how their failures read."""

    @property
    def refusal(self) -> type[Exception]:
        """What the engine's API raises when it refuses a request."""

    def open(self, uri: str) -> Engine:
        """Connect; ConnectionFailed (one line, with the fix) if it cannot."""

    def errors(self, uri: str, action: str) -> AbstractContextManager[None]:
        """Turn the engine's failures inside into the plugin's one-line errors: ConnectionLost
        when the connection dropped (the caller may reconnect), else KvmSnapError naming ``action``."""

    def agent_unavailable(self, exc: Exception) -> bool:
        """Is ``exc`` the agent not being there yet (its channel reconnects after a revert)?"""

    @property
    def service(self) -> str:
        """What users call the service that answers at a URI (libvirt: libvirtd), for messages."""

    @property
    def advice(self) -> Advice:
        """The commands messages advise, in the engine's own tool."""


def refusal(capabilities: Capabilities, *, clones: bool, revert_method: str, agent_required: bool,
            wait: str) -> str | None:
    """Why a run with these settings cannot be served by an engine that can do
    ``capabilities``; None when it can.  Decided before any guest is touched."""
    if not capabilities.memory:
        return ("its snapshots do not keep the guest's memory, and every revert would boot the guest; "
                "pytest-kvmsnap needs memory-preserving snapshots")
    if clones and not capabilities.clones:
        return "it cannot clone guests: drop --kvm-clones"
    if revert_method == "inplace" and not capabilities.hot_revert:
        return "it has no in-place revert: use --kvm-revert-method=auto"
    if (agent_required or wait == "agent") and not capabilities.agent:
        return "it has no guest agent: set --kvm-sync-clock/--kvm-reseed to auto and --kvm-wait to another kind"
    if not capabilities.leases:
        return "it keeps no leases, so runs on other hosts could take the same guest"
    return None


# --- ownership, read through any engine ------------------------------------------


def snapshot_owner(snapshot: Snapshot) -> Owner | None:
    """Who created ``snapshot``: an :class:`Owner` for the plugin's, None for the user's."""
    return Owner.from_description(snapshot.description())


def owned_snapshots(machine: Machine) -> list[tuple[Owner, Snapshot]]:
    """The guest's snapshots this plugin created (any run), with their owners."""
    pairs = ((snapshot_owner(snap), snap) for snap in machine.snapshots())
    return [(owner, snap) for owner, snap in pairs if owner is not None]


def kept_setups(machine: Machine) -> list[tuple[str, SetupRecord]]:
    """The guest setups kept on ``machine`` for later runs (reuse.py), by snapshot name."""
    pairs = ((snap.name, SetupRecord.from_description(snap.description())) for snap in machine.snapshots())
    return [(name, record) for name, record in pairs if record is not None]


def damaged_snapshots(machine: Machine) -> list[str]:
    """Snapshots whose ownership record does not parse: the user's, never touched."""
    return [snap.name for snap in machine.snapshots() if is_damaged(snap.description())]


def kept_for_user(machine: Machine) -> list[dict[str, Any]]:
    """The records of the guest's states kept for the user (any run), with their names."""
    return kept_records((snap.name, snap.description()) for snap in machine.snapshots())
