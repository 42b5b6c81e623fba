"""The :class:`Guest` tests receive, and the state the plugin keeps per guest."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pytest_kvmsnap.layers import LayerStack
from pytest_kvmsnap.locking import GuestLock
from pytest_kvmsnap.postmortem import ConsoleMark
from pytest_kvmsnap.records import RunRecord

if TYPE_CHECKING:
    import libvirt


@dataclass
class GuestState:
    """What one process knows about one guest (not public).

    ``record`` is the run record shared with the run's other processes; it is
    current while this process holds ``lock``.  The unit fields are this
    process's own: units never span processes.
    """

    name: str
    uri: str
    lock: GuestLock
    # None until this process holds the guest with the run's baseline recorded
    record: RunRecord | None = None
    unit: str | None = None
    unit_baseline: str | None = None
    unit_revert: str = "after"
    unit_failed: bool = False
    test_failed: bool = False  # the current test failed (its state may be kept)
    console: ConsoleMark | None = None  # where its console log stood when the test started
    broken: str | None = None
    clone_of: str = ""  # clone mode: ``name`` is this process's clone of that guest
    layers: LayerStack = field(default_factory=LayerStack)  # what wider fixtures built (layers.py)
    unit_tests: int = 0  # tests of the current unit started so far
    # the snapshot the guest was exactly at when the current test started (None: changed since)
    started_at: str | None = None

    @property
    def test_name(self) -> str:
        """The name tests use for the guest (in clone mode the original's, not the clone's)."""
        return self.clone_of or self.name

    @property
    def clean_at(self) -> str | None:
        """The snapshot the guest is known to be exactly at; None once a test used it."""
        return self.record.clean_at if self.record is not None else None

    @clean_at.setter
    def clean_at(self, value: str | None) -> None:
        if self.record is None:
            return
        self.record.clean_at = value
        if self.lock.held:
            self.lock.write(self.record)

    @property
    def baseline(self) -> str:
        """The snapshot the current unit reverts to ('' before the guest is held)."""
        return self.unit_baseline or (self.record.baseline if self.record is not None else "")


def summary(record: RunRecord, pool: bool = False) -> str:
    """The guest's line in the run's summary; in a pool of hosts, which host and which workers."""
    where = f"{record.domain} at {record.uri}" if pool else record.domain
    if record.clone_source:
        return (f"{where}: not used by tests; its disks (baseline inside) were copied for "
                f"the clones in {record.baseline_seconds:.2f} s")
    times = record.revert_times()
    median = statistics.median(times) if times else 0.0
    if pool:
        where += f" (served {', '.join(record.served) or 'no test'})"
    line = (f"{where}: baseline {record.baseline} taken in {record.baseline_seconds:.2f} s, "
            f"{len(times)} revert(s), total {sum(times):.2f} s, median {median:.3f} s")
    if record.waits:  # apart from the reverts: clock, entropy, --kvm-wait
        waits = [float(seconds) for seconds, _ in record.waits]
        steps = ", ".join(dict.fromkeys(step for _, steps in record.waits for step in steps))
        line += f"; ready after {len(waits)} of them in median {statistics.median(waits):.3f} s ({steps})"
    if record.checkpoints:  # layers: what wider fixtures built (layers.py)
        seconds = [float(s) for s, _ in record.checkpoints]
        line += (f"; {len(seconds)} checkpoint(s) of wider fixtures' state, median "
                 f"{statistics.median(seconds):.3f} s")
    return line


class Guest:
    """A guest as a test sees it (``domain`` and ``connection`` are the engine's own objects).

    ``baseline`` is the snapshot this test's unit reverts to; ``revert()`` goes
    back to it now.  Inside a running test the guest always counts as dirty.
    """

    def __init__(self, state: GuestState, connection: libvirt.virConnect, domain: libvirt.virDomain,
                 revert: Callable[[str], None], address: Callable[[int], tuple[str, int]]) -> None:
        self._state = state
        self._revert = revert
        self._address = address
        self.connection = connection
        self.domain = domain

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def uri(self) -> str:
        return self._state.uri

    @property
    def baseline(self) -> str:
        return self._state.baseline

    @property
    def is_dirty(self) -> bool:
        return self._state.clean_at != self.baseline

    @property
    def generation(self) -> int:
        """How many times this run has reverted the guest so far.

        An in-place revert rewinds the guest's TCP state: a client cached across
        tests (paramiko, testinfra, fabric) is stale once this changed.
        """
        return self._state.record.generation if self._state.record is not None else 0

    def address(self, port: int = 22) -> tuple[str, int]:
        """(host, port) where this machine reaches the guest's ``port``.

        On QEMU's user-mode network a free port on 127.0.0.1 is forwarded to it
        (each clone gets its own); on other networks, the guest's address from
        hypervisor (libvirt: DHCP lease, guest agent, ARP) and ``port`` itself.
        """
        return self._address(port)

    def revert(self) -> None:
        """Go back to the baseline now (the test goes on, so the guest stays in use)."""
        self._revert("requested by the test")

    def __repr__(self) -> str:
        return f"<Guest {self.name!r} at {self.uri} baseline={self.baseline!r}>"
