"""The end of a run, for its finisher: every guest back as found, nothing of the run left.

The finisher is the single pytest process, or xdist's controller once every
worker is done: only then is the run's last user of each guest known.  It
closes every record of the run: a guest is reverted to its baseline and the
run's snapshot deleted; a clone is destroyed and an original's copies removed.
"""

from __future__ import annotations

import contextlib
import time

from pytest_kvmsnap import resident
from pytest_kvmsnap.checkpoints import delete_run_layers
from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.engine import Machine, Snapshot, snapshot_owner
from pytest_kvmsnap.events import Notice, Reporter
from pytest_kvmsnap.exceptions import ConnectionFailed, KvmSnapError, LeaseLost
from pytest_kvmsnap.guestside import RESIDENT_IDLE
from pytest_kvmsnap.heartbeat import RunLeases
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.locking import RecordStore
from pytest_kvmsnap.ownership import kept_description
from pytest_kvmsnap.readiness import poll
from pytest_kvmsnap.records import RunRecord
from pytest_kvmsnap.resident import Resident
from pytest_kvmsnap.revert import Reverter

AGENT_AFTER_FINAL = 5.0  # seconds the agent gets to answer after the end-of-session revert


class Finisher:
    def __init__(self, settings: Settings, hypervisor: Hypervisor, reverter: Reverter, store: RecordStore,
                 report: Reporter) -> None:
        self.settings = settings
        self.hypervisor = hypervisor
        self.report = report
        self.reverter = reverter
        self.store = store
        self.finished: list[RunRecord] = []  # the records closed, for the summary

    def finish_run(self, run_id: str, leases: RunLeases) -> list[str]:
        """Close every record of run ``run_id``; one line per guest that could not be restored.

        A guest's lease is given back once it is restored; one that could not be
        restored keeps it until it expires, and the next run repairs the guest.
        """
        problems, unfinished = [], set()
        records = self.store.own_records(run_id)
        # Clones first: they run from the copies the originals' records name.
        for record in sorted(records, key=lambda r: not r.clone_of):
            problem = self._finish_guest(record, leases)
            if problem:
                problems.append(problem)
                unfinished.add((record.uri, record.domain))
        # Leases that failed baseline steps took, with no record left to close.
        for uri in sorted({*self.settings.pool, *(r.uri for r in records)}):
            try:
                leases.release_left(uri, unfinished)
            except ConnectionFailed:
                continue  # a host of the pool that was skipped: the run took nothing there
            except (KvmSnapError, self.hypervisor.kind.refusal) as exc:
                problems.append(f"this run's leases at {uri} could not all be given back (they expire by "
                                f"themselves): {exc}")
        return problems

    def _finish_guest(self, record: RunRecord, leases: RunLeases) -> str | None:
        settings = self.settings
        lock = self.store.lock(record.uri, record.domain)
        try:
            record = lock.load_history(lock.acquire(settings.lock_timeout, self.report) or record)
            if not record.clone_of:
                try:
                    leases.adopt(record.uri, record.domain)
                except LeaseLost as exc:
                    lock.remove()  # the guest is another run's now: this record says nothing true
                    return f"{record.domain}: {exc}"
            if record.clone_of or record.clone_source:
                self._finish_clone_mode(record)
                lock.remove(lock_file=bool(record.clone_of))  # a clone's name is never locked again
                if record.clone_source:
                    leases.release(record.uri, record.domain)
                return None
            machine = self.hypervisor.machine(record.domain, record.uri)
            baseline = self._ours(record, machine)
            restored = record.settle_restored  # a last revert whose clock no next test fixed
            if record.clean_at != record.baseline:
                self.reverter.revert(record, machine, record.baseline, "end of session", final=True)
                record.clean_at, restored = record.baseline, True
            if restored:
                self._clock_as_found(machine)
            self._stop_resident(record, machine)
            self._remove_forwards(record, machine)
            delete_run_layers(machine, record.run_id)  # before the baseline: recovery restores the lowest
            if settings.keep_snapshot:
                # Marked kept, so that no later run takes it for a dead run's orphan.
                machine.redescribe(baseline, kept_description({"run": record.run_id, "kept_at": time.time(),
                                                               "baseline": True}))
            else:
                machine.delete_snapshot(baseline)
            lock.remove()
            leases.release(record.uri, record.domain)
            return None
        except Exception as exc:  # keep going: every other guest must be restored too
            # The record stays: the next run sees a dead owner and restores the guest.
            return f"{record.domain}: {exc}"
        finally:
            self.finished.append(record)
            lock.release()

    @staticmethod
    def _ours(record: RunRecord, machine: Machine) -> Snapshot:
        """The snapshot the record names, if it carries this run's ownership record; else nothing is
        reverted or deleted: a record alone (a file) is never enough."""
        baseline = machine.snapshot(record.baseline)
        owner = snapshot_owner(baseline)
        if owner is None or owner.run_id != record.run_id:
            raise KvmSnapError(f"its snapshot {record.baseline!r} is not this run's (its description says "
                               f"{'someone else' if owner is None else 'run ' + owner.run_id}); left alone")
        return baseline

    def _clock_as_found(self, machine: Machine) -> None:
        """The baseline's clock is the run's start: set it to now, where the agent answers."""
        if self.settings.sync_clock == "off" or not machine.has_agent():
            return
        if not poll(lambda: machine.agent_answers(timeout=1), time.monotonic() + AGENT_AFTER_FINAL):
            return
        try:
            machine.refresh(clock=True, reseed=False)
        except (KvmSnapError, self.hypervisor.kind.refusal) as exc:  # restored all the same
            self.report(Notice(f"kvmsnap: {machine.name}: restored, but its clock could not be "
                               f"set to the host's: {exc}"))

    def _stop_resident(self, record: RunRecord, machine: Machine) -> None:
        """The resident settle process the baseline holds (resident.py) asked to quit: the guest as found."""
        started = Resident.from_record(record.resident)
        if started is None:
            return
        why = "its guest agent did not answer"
        if poll(lambda: machine.agent_answers(timeout=1), time.monotonic() + AGENT_AFTER_FINAL):
            try:
                if resident.stop(machine, started):
                    return
                why = "it did not answer"
            except (KvmSnapError, self.hypervisor.kind.refusal) as exc:
                why = str(exc)
        self.report(Notice(f"kvmsnap: {machine.name}: its resident settle process (pid {started.pid}) could "
                           f"not be stopped ({why}); it exits by itself {RESIDENT_IDLE // 60} minutes after its "
                           "last use"))

    def _remove_forwards(self, record: RunRecord, machine: Machine) -> None:
        """The host ports the run forwarded to the guest (Guest.address) go with it.

        Best effort: a forward dies with its QEMU process anyway, and the guest
        is restored whether or not this succeeds.
        """
        if not record.forwards:
            return  # most guests: no round trips to the hypervisor for nothing
        network = machine.user_network()
        identity = machine.process_identity()
        for host_port, process in record.forwards.values():
            if network is not None and identity is not None and identity[0] == process:
                with contextlib.suppress(KvmSnapError, self.hypervisor.kind.refusal):
                    machine.remove_forward(network, host_port)

    def _keep_clone(self, record: RunRecord) -> None:
        engine = self.hypervisor.engine(record.uri)
        try:
            engine.clones.keep(record.domain, record.kept, {"run": record.run_id, "clone_of": record.clone_of,
                                                            "kept_at": time.time()})
        except (OSError, self.hypervisor.kind.refusal) as exc:
            engine.clones.destroy(record.domain)  # nothing of the run is left behind half-kept
            raise KvmSnapError(f"the clone with failed states kept for you could not be kept ({exc}); "
                               "it was removed") from None

    def _finish_clone_mode(self, record: RunRecord) -> None:
        """A clone is destroyed, not restored (or kept, when it holds failed states kept for the
        user); an original's copies are deleted."""
        if record.clone_of and record.kept:
            self._keep_clone(record)
        elif record.clone_of:
            self.hypervisor.engine(record.uri).clones.destroy(record.domain)
        if record.clone_source:
            self.hypervisor.engine(record.uri).clones.remove_source(record.clone_source)
