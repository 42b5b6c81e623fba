"""What dead runs left: their snapshots, clones, disk copies and run records.

Shared by a run's baseline step (which repairs a guest before taking it) and
``pytest --kvm-cleanup``.  Only what carries this plugin's ownership record
naming a dead run is touched; a live run's things are listed at most.
"""

from __future__ import annotations

from collections.abc import Callable

from pytest_kvmsnap.engine import Machine, Snapshot, damaged_snapshots, kept_setups, owned_snapshots
from pytest_kvmsnap.events import Reporter
from pytest_kvmsnap.heartbeat import RunLeases
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.lease import Lease
from pytest_kvmsnap.locking import RecordStore
from pytest_kvmsnap.ownership import LeaseRecord, Owner

Orphan = tuple[Owner, Snapshot]


class Recovery:
    def __init__(self, hypervisor: Hypervisor, lease: Lease, leases: RunLeases, store: RecordStore,
                 uri: str, report: Reporter) -> None:
        self.hypervisor = hypervisor
        self.lease = lease
        self.leases = leases
        self.uri = uri  # the configured URI, where --kvm-cleanup looks
        self.report = report
        self.store = store

    def _dead_other(self, owner: Owner, uri: str, name: str) -> bool:
        """Was ``owner`` another run, now dead (so what it left of guest ``name`` is an orphan)?"""
        return owner.run_id != self.lease.owner.run_id and not self.lease.alive(owner, uri, name)

    def orphans(self, machine: Machine, uri: str) -> list[Orphan]:
        """The guest's snapshots that dead runs of this plugin left, oldest first."""
        found = [(owner, snap) for owner, snap in owned_snapshots(machine)
                 if self._dead_other(owner, uri, machine.name)]
        return sorted(found, key=lambda pair: (pair[0].started, pair[0].layer))  # a run's baseline first

    def _orphan_clones(self, machine: Machine, uri: str, orphans: list[Orphan]) -> tuple[list[str], list[str]]:
        """Dead runs' clones and pools of copies; ``orphans``, their snapshots on the guest, say
        which runs are dead even once those are gone."""
        return self.hypervisor.engine(uri).clones.orphans(
            machine, lambda owner: self._dead_other(owner, uri, machine.name),
            frozenset(owner.run_id for owner, _snap in orphans))

    def repair(self, name: str, machine: Machine, uri: str) -> list[str]:
        """Put the guest back, drop dead runs' snapshots, clones and copies; one line each."""
        done = [f"kvmsnap: {name}: snapshot {snap} has a damaged pytest-kvmsnap record in its description; "
                "it counts as yours and is left alone" for snap in damaged_snapshots(machine)]
        orphans = self.orphans(machine, uri)
        if orphans:
            oldest, snap = orphans[0]
            machine.revert_cold(snap)  # the dead run left the guest mid-test
            for _, orphan in orphans:
                machine.delete_snapshot(orphan)
            done.append(f"kvmsnap: {name}: restored to {snap.name} left by dead run {oldest.run_id} "
                        f"(pid {oldest.pid} on {oldest.host}) and deleted {len(orphans)} orphan snapshot(s)")
        dead_clones, pools = self._orphan_clones(machine, uri, orphans)
        engine = self.hypervisor.engine(uri)
        for clone in dead_clones:
            engine.clones.destroy(clone)
            # Its name holds the dead run's id: no one will lock it again.
            self.store.lock(uri, clone).remove(lock_file=True)
        for pool in pools:
            engine.clones.remove_pool(pool)
        if dead_clones or pools:
            done.append(f"kvmsnap: {name}: removed {len(dead_clones)} clone(s) and {len(pools)} "
                        "pool(s) of disk copies left by dead runs")
        return done

    def cleanup(self, name: str, dry_run: bool) -> list[str]:
        """``--kvm-cleanup``: repair one guest dead runs left, under its lock and its lease."""
        uri = self.uri
        machine = self.hypervisor.engine(uri).machine(name, checked=False)
        lines = [f"{name}: {snap.name} belongs to live run {owner.run_id} "
                 f"(pid {owner.pid} on {owner.host}); left alone"
                 for owner, snap in owned_snapshots(machine) if self.lease.alive(owner, uri, name)]
        orphans = self.orphans(machine, uri)
        dead_clones, pools = self._orphan_clones(machine, uri, orphans)
        lease = self.hypervisor.engine(uri).leases.read(name)
        dead_lease = lease is not None and not self.leases.holder_alive(lease[1])
        if dry_run:
            if orphans:
                names = ", ".join(snap.name for _, snap in orphans)
                lines.append(f"{name}: would restore the guest to {orphans[0][1].name} "
                             f"and delete orphan snapshot(s) {names}")
            lines.extend(f"{name}: would remove clone {clone}" for clone in dead_clones)
            lines.extend(f"{name}: would remove pool {pool} (disk copies)" for pool in pools)
            if dead_lease and lease is not None:
                lines.append(f"{name}: would remove the lease of dead run {lease[1].holder.run_id}")
        elif orphans or dead_clones or pools or dead_lease:
            lines.extend(self._repair_held(name, machine, uri, lease[1] if dead_lease and lease else None))
        return lines or [f"{name}: nothing to clean"]

    def cleanup_setups(self, name: str, dry_run: bool, keep: bool) -> list[str]:
        """``--kvm-cleanup``: list the guest setups kept for later runs (reuse.py); delete them,
        under the guest's lock and lease, unless ``keep``."""
        machine = self.hypervisor.engine(self.uri).machine(name, checked=False)
        kept = kept_setups(machine)
        if not kept or keep or dry_run:
            verb = "left alone" if keep else "would delete it"
            return [f"{name}: kept guest setup {snapshot} (fixture {record.fixture!r}, kept by run {record.run_id}); "
                    f"{verb}" for snapshot, record in kept]

        def delete(_name: str, machine: Machine, _uri: str) -> list[str]:
            lines = []
            for snapshot, record in kept_setups(machine):
                machine.delete_snapshot(machine.snapshot(snapshot))
                lines.append(f"{name}: deleted kept guest setup {snapshot} (fixture {record.fixture!r}, "
                             f"kept by run {record.run_id})")
            return lines
        return self._held(name, machine, self.uri, delete)

    def _repair_held(self, name: str, machine: Machine, uri: str,
                     dead_lease: LeaseRecord | None) -> list[str]:
        """Repair under the guest's lock and its lease (a dead run's lease is taken over, then
        given back: it is gone)."""
        repaired: list[bool] = []

        def repair(name: str, machine: Machine, uri: str) -> list[str]:
            repaired.append(True)
            return self.repair(name, machine, uri)
        lines = self._held(name, machine, uri, repair)
        if dead_lease is not None and repaired:
            dead = dead_lease.holder
            lines.append(f"{name}: removed the lease of dead run {dead.run_id} (pid {dead.pid} on {dead.host})")
        return lines

    def _held(self, name: str, machine: Machine, uri: str,
              step: Callable[[str, Machine, str], list[str]]) -> list[str]:
        lock = self.store.lock(uri, name)
        lock.acquire(self.lease.lock_timeout, self.report, admit=self.lease.may_use)
        try:
            holder = self.leases.take(uri, name)
            if holder is not None:  # a live run took the guest since the lease was read
                return [f"{name}: held by live {holder.describe()}; left alone"]
            try:
                return step(name, machine, uri)
            finally:
                self.leases.release(uri, name)
        finally:
            lock.release()

    def unused_locks(self, dry_run: bool) -> list[str]:
        """Lock files of guests that no longer exist at the URI (lock files are bounded by guests)."""
        existing = set(self.hypervisor.engine().guest_names())
        return self.store.remove_unused_locks(self.uri, existing.__contains__, dry_run)

    def stale_records(self, dry_run: bool) -> list[str]:
        """Run records of dead runs whose guests had nothing left to repair."""
        lines = []
        for record in self.store.records():
            if record.owner_alive():
                continue
            lines.append(f"{record.domain}: {'would remove' if dry_run else 'removed'} the record of "
                         f"dead run {record.run_id} (pid {record.owner_pid})")
            if not dry_run:
                lock = self.store.lock(record.uri, record.domain)
                lock.acquire(self.lease.lock_timeout, self.report, admit=self.lease.may_use)
                lock.remove()
                lock.release()
        return lines
