"""Taking and dropping layers (layers.py) on a held guest.

A checkpoint is an internal snapshot with memory, taken in place like the
baseline and carrying the run's ownership record with its depth, so that
``--kvm-cleanup``, the recovery of killed runs and the run's end treat it like
the baseline: a dead run's guest goes back to its baseline and every snapshot it
left is deleted.  No pytest here.
"""

from __future__ import annotations

import dataclasses
import time

from pytest_kvmsnap import reuse
from pytest_kvmsnap.engine import Machine, kept_setups, owned_snapshots
from pytest_kvmsnap.events import Notice, Reporter
from pytest_kvmsnap.guest import GuestState
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.layers import Fixture, Layer, layer_name
from pytest_kvmsnap.ownership import Owner, SetupRecord
from pytest_kvmsnap.revert import remember_loaded


class Checkpoints:
    def __init__(self, hypervisor: Hypervisor, owner: Owner, worker: str, report: Reporter) -> None:
        self.hypervisor = hypervisor
        self.owner = owner
        self.worker = worker
        self.report = report
        self._taken = 0  # layers this process took: their names are unique in it

    def take(self, state: GuestState, base: str, fixtures: tuple[Fixture, ...]) -> Layer:
        """Checkpoint the held guest now, on top of its layers; the unit's reverts go there."""
        record = state.record
        assert record is not None, "only a held guest is checkpointed"
        self._taken += 1
        layer = Layer(layer_name(record.baseline, self.worker, self._taken), fixtures)
        owner = dataclasses.replace(self.owner, layer=len(state.layers.layers) + 1)
        machine = self.hypervisor.machine(state.name, state.uri)
        start = time.perf_counter()
        with self.hypervisor.errors(state.uri, f"checkpointing {state.name!r} after {layer.describe()}"):
            snap = machine.take_baseline(layer.snapshot, owner)
        seconds = time.perf_counter() - start
        remember_loaded(record, machine, snap)  # this QEMU process took it: it may load it in place
        state.layers.push(base, layer)
        record.checkpoints.append((seconds, f"{layer.snapshot} after {layer.describe()}"))
        state.lock.write(record)
        self.report(Notice(f"kvmsnap: {state.name}: checkpoint {layer.snapshot} after {layer.describe()} "
                           f"({seconds:.2f} s)"))
        return layer

    def delete(self, state: GuestState, layers: list[Layer]) -> None:
        """Delete ended layers' snapshots from the held guest (their fixtures are gone)."""
        if not layers:
            return
        machine = self.hypervisor.machine(state.name, state.uri)
        with self.hypervisor.errors(state.uri, f"deleting the ended layers of {state.name!r}"):
            for layer in layers:
                snap = None if layer.kept else machine.find_snapshot(layer.snapshot)
                if snap is not None:
                    machine.delete_snapshot(snap)
                if state.record is not None and not layer.kept:  # a kept one may be reused in this run
                    state.record.inplace_ok.pop(layer.snapshot, None)

    def find_setup(self, state: GuestState, key: str) -> tuple[str, SetupRecord] | None:
        """The guest's kept setup built under ``key``, complete; None if it has none."""
        machine = self.hypervisor.machine(state.name, state.uri)
        for name, record in kept_setups(machine):
            if record.key == key and machine.holds_memory(name):
                return name, record
        return None

    def keep_setup(self, state: GuestState, base: str, fixture: Fixture, record: SetupRecord) -> Layer:
        """Keep the guest's state now as the setup ``record`` describes, as a layer of this run that
        outlives it; then delete what it replaces and the oldest beyond reuse.BOUND."""
        run_record = state.record
        assert run_record is not None, "only a held guest is checkpointed"
        layer = Layer(reuse.snapshot_name(fixture.name, record.key), (fixture,), kept=True)
        machine = self.hypervisor.machine(state.name, state.uri)
        with self.hypervisor.errors(state.uri, f"keeping {state.name!r} after {layer.describe()}"):
            old = machine.find_snapshot(layer.snapshot)  # built under this key but cut short
            if old is not None:
                machine.delete_snapshot(old)
            start = time.perf_counter()  # the checkpoint's figure: the save alone, as for any layer
            machine.save_state(layer.snapshot, record.to_description())
            seconds = time.perf_counter() - start
            for name in reuse.to_delete(kept_setups(machine), record, layer.snapshot):
                machine.delete_snapshot(machine.snapshot(name))
        remember_loaded(run_record, machine, machine.snapshot(layer.snapshot))
        run_record.checkpoints.append((seconds, f"{layer.snapshot} (kept for later runs) after {layer.describe()}"))
        self.use_setup(state, base, layer)  # writes the run record, this checkpoint in it
        self.report(Notice(f"kvmsnap: {state.name}: kept {layer.snapshot} after {layer.describe()} for later "
                           f"runs ({seconds:.2f} s); --kvm-cleanup removes it"))
        return layer

    def use_setup(self, state: GuestState, base: str, layer: Layer) -> None:
        """The guest is on the kept setup ``layer`` now: the unit's reverts go there."""
        state.layers.push(base, layer)
        state.unit_baseline = layer.snapshot
        if state.record is not None:
            state.lock.write(state.record)


def delete_run_layers(machine: Machine, run_id: str) -> None:
    """Every layer of run ``run_id`` on the guest, any process's (a crashed worker's too)."""
    for owner, snap in owned_snapshots(machine):
        if owner.run_id == run_id and owner.layer:
            machine.delete_snapshot(snap)
