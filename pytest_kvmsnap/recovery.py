"""What dead runs left: their snapshots, clones, disk copies and run records.

Shared by a run's baseline step (which repairs a guest before taking it) and
``pytest --kvm-cleanup``.  Only what carries this plugin's ownership record
naming a dead run is touched; a live run's things are listed at most.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_kvmsnap import backend, clones, leasedomain
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.lease import Lease
from pytest_kvmsnap.leasedomain import LeaseRecord
from pytest_kvmsnap.locking import RecordStore

if TYPE_CHECKING:
    import libvirt

Orphan = tuple[backend.Owner, "libvirt.virDomainSnapshot"]


class Recovery:
    def __init__(self, hypervisor: Hypervisor, lease: Lease, store: RecordStore) -> None:
        self.hypervisor = hypervisor
        self.lease = lease
        self.store = store

    def _dead_other(self, owner: backend.Owner, uri: str, name: str) -> bool:
        """Was ``owner`` another run, now dead (so what it left of guest ``name`` is an orphan)?"""
        return owner.run_id != self.lease.owner.run_id and not self.lease.alive(owner, uri, name)

    def orphans(self, dom: libvirt.virDomain, uri: str) -> list[Orphan]:
        """The guest's snapshots that dead runs of this plugin left, oldest first."""
        found = [(owner, snap) for owner, snap in backend.owned_snapshots(dom)
                 if self._dead_other(owner, uri, dom.name())]
        return sorted(found, key=lambda pair: pair[0].started)

    def _orphan_clones(self, dom: libvirt.virDomain, uri: str) -> tuple[list[str], list[str]]:
        return clones.orphans(self.hypervisor.connection(uri), dom,
                              lambda owner: self._dead_other(owner, uri, dom.name()))

    def repair(self, name: str, dom: libvirt.virDomain, uri: str) -> list[str]:
        """Put the guest back, drop dead runs' snapshots, clones and copies; one line each."""
        done = [f"kvmsnap: {name}: snapshot {snap} has a damaged pytest-kvmsnap record in its description; "
                "it counts as yours and is left alone" for snap in backend.damaged_snapshots(dom)]
        orphans = self.orphans(dom, uri)
        if orphans:
            oldest, snap = orphans[0]
            backend.revert_libvirt(dom, snap)  # the dead run left the guest mid-test
            for _, orphan in orphans:
                backend.delete_snapshot(orphan)
            done.append(f"kvmsnap: {name}: restored to {snap.getName()} left by dead run {oldest.run_id} "
                        f"(pid {oldest.pid} on {oldest.host}) and deleted {len(orphans)} orphan snapshot(s)")
        dead_clones, pools = self._orphan_clones(dom, uri)
        conn = self.hypervisor.connection(uri)
        for clone in dead_clones:
            clones.destroy(conn, clone)
            # Its name holds the dead run's id: no one will lock it again.
            self.store.lock(uri, clone).remove(lock_file=True)
        for pool in pools:
            clones.remove_own_pool(conn, pool)
        if dead_clones or pools:
            done.append(f"kvmsnap: {name}: removed {len(dead_clones)} clone(s) and {len(pools)} "
                        "pool(s) of disk copies left by dead runs")
        return done

    def cleanup(self, name: str, dry_run: bool) -> list[str]:
        """``--kvm-cleanup``: repair one guest dead runs left, under its lock and its lease."""
        uri = self.hypervisor.settings.uri
        dom = backend.lookup_domain(self.hypervisor.connection(uri), name)
        lines = [f"{name}: {snap.getName()} belongs to live run {owner.run_id} "
                 f"(pid {owner.pid} on {owner.host}); left alone"
                 for owner, snap in backend.owned_snapshots(dom) if self.lease.alive(owner, uri, name)]
        orphans = self.orphans(dom, uri)
        dead_clones, pools = self._orphan_clones(dom, uri)
        lease = leasedomain.read(self.hypervisor.connection(uri), name)
        dead_lease = lease is not None and not self.lease.leases.holder_alive(lease[1])
        if dry_run:
            if orphans:
                names = ", ".join(snap.getName() for _, snap in orphans)
                lines.append(f"{name}: would restore the guest to {orphans[0][1].getName()} "
                             f"and delete orphan snapshot(s) {names}")
            lines.extend(f"{name}: would remove clone {clone}" for clone in dead_clones)
            lines.extend(f"{name}: would remove pool {pool} (disk copies)" for pool in pools)
            if dead_lease and lease is not None:
                lines.append(f"{name}: would remove the lease of dead run {lease[1].holder.run_id}")
        elif orphans or dead_clones or pools or dead_lease:
            lines.extend(self._repair_held(name, dom, uri, lease[1] if dead_lease and lease else None))
        return lines or [f"{name}: nothing to clean"]

    def _repair_held(self, name: str, dom: libvirt.virDomain, uri: str,
                     dead_lease: LeaseRecord | None) -> list[str]:
        """Repair under the guest's lock and its lease (a dead run's lease is taken over, then
        given back: it is gone)."""
        lock = self.store.lock(uri, name)
        lock.acquire(self.lease.lock_timeout, self.hypervisor.report, admit=self.lease.may_use)
        try:
            holder = self.lease.leases.take(uri, name)
            if holder is not None:  # a live run took the guest since the lease was read
                return [f"{name}: held by live {holder.describe()}; left alone"]
            try:
                lines = self.repair(name, dom, uri)
            finally:
                self.lease.leases.release(uri, name)
        finally:
            lock.release()
        if dead_lease is not None:
            dead = dead_lease.holder
            lines.append(f"{name}: removed the lease of dead run {dead.run_id} (pid {dead.pid} on {dead.host})")
        return lines

    def unused_locks(self, dry_run: bool) -> list[str]:
        """Lock files of guests that no longer exist at the URI (lock files are bounded by guests)."""
        existing = {dom.name() for dom in self.hypervisor.connection().listAllDomains()}
        return self.store.remove_unused_locks(self.hypervisor.settings.uri, existing.__contains__, dry_run)

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
                lock.acquire(self.lease.lock_timeout, self.hypervisor.report, admit=self.lease.may_use)
                lock.remove()
                lock.release()
        return lines
