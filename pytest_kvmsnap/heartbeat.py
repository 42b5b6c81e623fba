"""This run's leases on its guests' hypervisors (``leasedomain.py``), kept alive by a thread.

Every process of the run that uses a guest holds its lease here and renews it
every quarter of ``kvm_lease_expiry`` on a connection of its own, so a slow
libvirt call in a test never delays a renewal.  The rules that make a take-over
by another host safe:

* a renewal is made only while more than a quarter of the expiry is left (by
  this host's clock); later, the lease counts as lost, because another host
  may take it over as soon as it expired (by its clock);
* a lease that is lost stays lost: this process touches its guest no more, and
  its tests error, saying so.

Between them, two hosts whose clocks agree within a quarter of the expiry never
both believe they hold a guest.  No pytest here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pytest_kvmsnap import backend, leasedomain
from pytest_kvmsnap.config import this_host
from pytest_kvmsnap.exceptions import KvmSnapError, LeaseLost
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.leasedomain import LeaseRecord, Taken
from pytest_kvmsnap.locking import running

if TYPE_CHECKING:
    import libvirt

Key = tuple[str, str]  # (uri, guest)
TAKE_ATTEMPTS = 3  # reads of a lease that keeps changing hands under us before giving up
RETRY_AFTER_FAILURE = 1.0  # seconds to the next renewal after a failed one (libvirtd restarting)


@dataclass
class _Held:
    uuid: str  # the lease domain's: a renewal by UUID fails once another run took it over
    expires: float


class RunLeases:
    def __init__(self, hypervisor: Hypervisor, owner: backend.Owner, expiry: float) -> None:
        self.hypervisor = hypervisor
        self.owner = owner
        self.expiry = expiry
        self._held: dict[Key, _Held] = {}
        self._lost: dict[Key, str] = {}
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connections: dict[str, libvirt.virConnect] = {}  # the renewing thread's own

    @property
    def quarter(self) -> float:
        """How often a lease is renewed, and how much of it must be left for a renewal."""
        return self.expiry / 4

    def _new(self, guest: str) -> LeaseRecord:
        return LeaseRecord(guest, self.owner, time.time() + self.expiry)

    def holder_alive(self, record: LeaseRecord) -> bool:
        """Is the lease's holder still entitled to it? On this host its process must be there too."""
        holder = record.holder
        if record.expired():
            return False
        return holder.host != this_host() or running(holder.host, holder.pid, holder.proc)

    def live_holder(self, uri: str, guest: str) -> LeaseRecord | None:
        """Another run's lease on the guest, while it entitles that run to it; else None."""
        found = leasedomain.read(self.hypervisor.connection(uri), guest)
        if found is None or found[1].holder.run_id == self.owner.run_id or not self.holder_alive(found[1]):
            return None
        return found[1]

    # --- taking and keeping ----------------------------------------------------

    def take(self, uri: str, guest: str) -> LeaseRecord | None:
        """Take the guest's lease for this run: None once held, else the live holder's lease (wait)."""
        conn = self.hypervisor.connection(uri)
        for _ in range(TAKE_ATTEMPTS):
            found = leasedomain.read(conn, guest)
            lease = self._new(guest)
            try:
                if found is None:
                    dom = leasedomain.define(conn, lease)
                elif found[1].holder.run_id == self.owner.run_id and self._why_not_ours(found[1]) is None:
                    # The run's, from a step that failed: another of its processes may renew it
                    # by its UUID, so it is renewed, not replaced.
                    dom = found[0]
                    if not leasedomain.renew(dom, lease):
                        continue
                elif found[1].holder.run_id != self.owner.run_id and self.holder_alive(found[1]):
                    return found[1]
                else:  # expired, or its holder is dead: taken over, atomically
                    dom = leasedomain.take_over(conn, found[0], lease)
            except Taken:
                continue  # another host was first: read again who holds it now
            self._keep((uri, guest), dom, lease.expires)
            return None
        found = leasedomain.read(conn, guest)
        if found is not None and found[1].holder.run_id != self.owner.run_id:
            return found[1]
        raise KvmSnapError(f"the lease on guest {guest!r} changed hands {TAKE_ATTEMPTS} times while this run "
                           "tried to take it; try again")

    def adopt(self, uri: str, guest: str) -> None:
        """The run holds the guest (its record says so): keep its lease alive from this process too.

        Raises :class:`LeaseLost` if the lease is no longer the run's, or too near its
        expiry to be renewed safely.
        """
        key = (uri, guest)
        with self._mutex:
            known = key in self._held
        if known:
            self.check(uri, guest)
            return
        found = leasedomain.read(self.hypervisor.connection(uri), guest)
        why = self._why_not_ours(found[1] if found else None)
        if why is None:
            assert found is not None, "checked above"
            renewed = self._new(guest)
            if leasedomain.renew(found[0], renewed):
                self._keep(key, found[0], renewed.expires)
                return
            why = "it was taken over just now"
        self._lose(key, why)
        self.check(uri, guest)

    def _why_not_ours(self, record: LeaseRecord | None) -> str | None:
        if record is None:
            return "it is gone from the hypervisor (taken over and released, or removed by hand)"
        if record.holder.run_id != self.owner.run_id:
            return f"another run took it over: {record.describe()}"
        if time.time() >= record.expires - self.quarter:
            return self._too_late()
        return None

    def _too_late(self) -> str:
        return (f"it was not renewed in time (less than {self.quarter:.0f} s of it left; this process was "
                "stopped, or the hypervisor could not be reached)")

    def _keep(self, key: Key, dom: libvirt.virDomain, expires: float) -> None:
        with self._mutex:
            self._held[key] = _Held(dom.UUIDString(), expires)
            self._lost.pop(key, None)
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew_all, name="kvmsnap-lease-renewal", daemon=True)
            self._thread.start()

    def _lose(self, key: Key, why: str) -> None:
        with self._mutex:
            self._held.pop(key, None)
            self._lost[key] = why

    def check(self, uri: str, guest: str) -> None:
        """Raise :class:`LeaseLost` if this process held the guest's lease and may no longer trust it."""
        key = (uri, guest)
        with self._mutex:
            lost, held = self._lost.get(key), self._held.get(key)
        if lost is None and held is not None and time.time() >= held.expires - self.quarter:
            lost = self._too_late()
            self._lose(key, lost)
        if lost is not None:
            raise LeaseLost(f"this run's lease on guest {guest!r} at {uri} is lost: {lost}. The guest is "
                            "no longer this run's; nothing of it is touched again")

    # --- the renewing thread ---------------------------------------------------

    def _renew_all(self) -> None:
        pause = self.quarter
        while not self._stop.wait(pause):
            with self._mutex:
                held = list(self._held.items())
            pause = self.quarter
            for key, lease in held:
                try:
                    self._renew(key, lease)
                except Exception:  # unreachable now, or libvirtd restarted: a new connection, soon
                    with contextlib.suppress(Exception):
                        self._connections.pop(key[0]).close()
                    pause = min(self.quarter, RETRY_AFTER_FAILURE)

    def _renew(self, key: Key, lease: _Held) -> None:
        uri, guest = key
        libvirt = backend.lib()
        conn = self._connections.get(uri) or self._connections.setdefault(uri, backend.open_connection(uri))
        try:
            dom = conn.lookupByUUIDString(lease.uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            now = leasedomain.read(conn, guest)  # who has it now, for the message
            self._lose(key, self._why_not_ours(now[1] if now else None) or "another run took it over")
            return
        why = self._why_not_ours(leasedomain.reread(dom))
        renewed = self._new(guest)
        if why is None and not leasedomain.renew(dom, renewed):
            why = "another run took it over"
        if why is not None:
            self._lose(key, why)
            return
        with self._mutex:
            if key in self._held:
                self._held[key].expires = renewed.expires

    # --- the end ----------------------------------------------------------------

    def release(self, uri: str, guest: str) -> None:
        """Give the guest's lease back (the run is done with it); a lease no longer ours is left."""
        with self._mutex:
            self._held.pop((uri, guest), None)
        found = leasedomain.read(self.hypervisor.connection(uri), guest)
        if found is not None and found[1].holder.run_id == self.owner.run_id:
            leasedomain.release(found[0])

    def release_left(self, uri: str, keep: set[Key]) -> None:
        """Give back every other lease of the run at ``uri`` (failed baseline steps took them)."""
        for dom, record in leasedomain.all_leases(self.hypervisor.connection(uri)):
            if record.holder.run_id == self.owner.run_id and (uri, record.guest) not in keep:
                leasedomain.release(dom)

    def stop(self) -> None:
        """No more renewals from this process (the leases themselves are left to the finisher)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for conn in self._connections.values():
            with contextlib.suppress(Exception):
                conn.close()
        self._connections.clear()
