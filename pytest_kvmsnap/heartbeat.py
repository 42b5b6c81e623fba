"""This run's leases on its guests' hypervisors (the engine's, ``leases.py`` on libvirt),
kept alive by a thread.

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

from pytest_kvmsnap.config import this_host
from pytest_kvmsnap.engine import Engine, LeaseHandle
from pytest_kvmsnap.exceptions import KvmSnapError, LeaseLost
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.ownership import LeaseRecord, Owner, Taken
from pytest_kvmsnap.processes import running

Key = tuple[str, str]  # (uri, guest)
TAKE_ATTEMPTS = 3  # reads of a lease that keeps changing hands under us before giving up
RETRY_AFTER_FAILURE = 1.0  # seconds to the next renewal after a failed one (libvirtd restarting)


@dataclass
class _Held:
    id: str  # the lease's (libvirt: its domain's UUID): a renewal by it fails once another run took it over
    expires: float


class RunLeases:
    def __init__(self, hypervisor: Hypervisor, owner: Owner, expiry: float) -> None:
        self.hypervisor = hypervisor
        self.owner = owner
        self.expiry = expiry
        self._held: dict[Key, _Held] = {}
        self._lost: dict[Key, str] = {}
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engines: dict[str, Engine] = {}  # the renewing thread's own connections

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
        found = self.hypervisor.engine(uri).leases.read(guest)
        if found is None or found[1].holder.run_id == self.owner.run_id or not self.holder_alive(found[1]):
            return None
        return found[1]

    # --- taking and keeping ----------------------------------------------------

    def take(self, uri: str, guest: str) -> LeaseRecord | None:
        """Take the guest's lease for this run: None once held, else the live holder's lease (wait)."""
        engine = self.hypervisor.engine(uri)
        for _ in range(TAKE_ATTEMPTS):
            found = engine.leases.read(guest)
            lease = self._new(guest)
            try:
                if found is None:
                    handle = engine.leases.define(lease)
                elif found[1].holder.run_id == self.owner.run_id and self._why_not_ours(found[1]) is None:
                    # The run's, from a step that failed: another of its processes may renew it
                    # by its UUID, so it is renewed, not replaced.
                    handle = found[0]
                    if not engine.leases.renew(handle, lease):
                        continue
                elif found[1].holder.run_id != self.owner.run_id and self.holder_alive(found[1]):
                    return found[1]
                else:  # expired, or its holder is dead: taken over, atomically
                    handle = engine.leases.take_over(found[0], lease)
            except Taken:
                continue  # another host was first: read again who holds it now
            self._keep((uri, guest), handle, lease.expires)
            return None
        found = engine.leases.read(guest)
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
        engine = self.hypervisor.engine(uri)
        found = engine.leases.read(guest)
        why = self._why_not_ours(found[1] if found else None)
        if why is None:
            assert found is not None, "checked above"
            renewed = self._new(guest)
            if engine.leases.renew(found[0], renewed):
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

    def _keep(self, key: Key, handle: LeaseHandle, expires: float) -> None:
        with self._mutex:
            self._held[key] = _Held(handle.id, expires)
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
                        self._engines.pop(key[0]).close()
                    pause = min(self.quarter, RETRY_AFTER_FAILURE)

    def _renew(self, key: Key, lease: _Held) -> None:
        uri, guest = key
        engine = self._engines.get(uri) or self._engines.setdefault(
            uri, self.hypervisor.open_separate(uri))
        handle = engine.leases.by_id(lease.id)
        if handle is None:
            now = engine.leases.read(guest)  # who has it now, for the message
            # Under its name now: another run's lease, none, or (None from _why_not_ours) a new one of
            # this run's, which another of its processes took once this one's had run out.
            self._lose(key, self._why_not_ours(now[1] if now else None)
                       or "another process of this run replaced it with a new lease after it had run out")
            return
        why = self._why_not_ours(engine.leases.reread(handle))
        renewed = self._new(guest)
        if why is None and not engine.leases.renew(handle, renewed):
            why = "it was taken over just now"
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
        engine = self.hypervisor.engine(uri)
        found = engine.leases.read(guest)
        if found is not None and found[1].holder.run_id == self.owner.run_id:
            engine.leases.release(found[0])

    def release_left(self, uri: str, keep: set[Key]) -> None:
        """Give back every other lease of the run at ``uri`` (failed baseline steps took them)."""
        engine = self.hypervisor.engine(uri)
        for handle, record in engine.leases.all():
            if record.holder.run_id == self.owner.run_id and (uri, record.guest) not in keep:
                engine.leases.release(handle)

    def stop(self) -> None:
        """No more renewals from this process (the leases themselves are left to the finisher)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for engine in self._engines.values():
            with contextlib.suppress(Exception):
                engine.close()
        self._engines.clear()
