"""The run record: what a run keeps about a guest beside its lock (locking.py), as plain data.

Which run owns the guest (its id, owner pid and host, start), the baseline,
which snapshot the guest is exactly at, who holds it, and in clone mode where
the run's copies are.  A record on disk is read back defensively: a torn,
hand-edited or foreign file counts as no record, never a crash.  No pytest here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pytest_kvmsnap.processes import running

HISTORY = ("reverts", "waits", "checkpoints")  # RunRecord lists kept in an append-only file beside the record


@dataclass
class CloneSource:
    """Clone mode, on the original's record: the run's copies of its disks (see clones.py)."""

    directory: str  # the pool's directory on the hypervisor
    disks: dict[str, str]  # target device -> volume in the pool: a copy with the baseline inside
    snapshot_xml: str
    domain_xml: str
    pool: str = ""  # the run's storage pool holding the copies


@dataclass
class RunRecord:
    uri: str
    domain: str
    run_id: str
    owner_pid: int
    host: str
    started: float
    baseline: str
    clean_at: str | None  # the snapshot the guest is exactly at; None once a test used it
    baseline_seconds: float = 0.0
    holder: str = ""
    since: float = 0.0
    # snapshot -> [libvirt domain id, device hash] of the QEMU that may loadvm it
    inplace_ok: dict[str, list[object]] = field(default_factory=dict)
    # (seconds, method, target, reason) of the reverts in this run: in memory, this process's
    # since it took the guest; on disk, all workers', appended to the record's history file
    reverts: list[tuple[float, str, str, str]] = field(default_factory=list)
    # snapshot -> how it is reverted and why ("inplace (QEMU loadvm)", "restart (...)")
    revert_methods: dict[str, str] = field(default_factory=dict)
    # one-line events any process of the run saw (orphans repaired, holder died)
    events: list[str] = field(default_factory=list)
    # the last holder owed a revert it could not make (it died mid-unit, or its
    # end-of-unit revert failed): the next unit reverts first, whatever its mode
    revert_owed: bool = False
    # reverts of the guest in this run, all workers: a cached connection is stale once it moved
    generation: int = 0
    # after the baseline or a revert, the guest is made usable before the next test
    # (readiness.py); ``settle_restored``: its state came from a snapshot
    settle_pending: bool = False
    settle_restored: bool = False
    # (seconds, steps) of each of those waits; kept like ``reverts``
    waits: list[tuple[float, tuple[str, ...]]] = field(default_factory=list)
    # (seconds, what) of each checkpoint of wider fixtures' state (layers.py); kept like ``reverts``
    checkpoints: list[tuple[float, str]] = field(default_factory=list)
    # user-mode network: guest port -> [host port on 127.0.0.1, QEMU domain id it was forwarded in]
    forwards: dict[str, list[int]] = field(default_factory=dict)
    # [port, pid, token] of the resident settle process started before the baseline (resident.py)
    resident: list[object] = field(default_factory=list)
    # clone mode: on a clone's record, the original it was cloned from; on the
    # original's record, where the run's source images are (see clones.py)
    clone_of: str = ""
    clone_source: CloneSource | None = None
    # a clone's snapshots kept for the user (--kvm-keep-failed): the clone is kept after the run
    kept: list[str] = field(default_factory=list)
    # the owner's process_token: a reused pid is not the owner
    owner_proc: str = ""
    # the run's processes ("main", or xdist's gwN) that used the guest, for the summary
    served: list[str] = field(default_factory=list)
    # the process holding the guest now, and the guest it waits for meanwhile (deadlock.py)
    holder_pid: int = 0
    waiting_for: str = ""
    # how many of ``reverts`` and ``waits`` are in the history file already (not written)
    history_saved: dict[str, int] = field(default_factory=dict, compare=False)

    def revert_times(self) -> list[float]:
        return [float(seconds) for seconds, *_ in self.reverts]

    def describe(self) -> str:
        age = time.time() - self.since if self.since else 0.0
        return (f"run {self.run_id} (pid {self.owner_pid} on {self.host}), "
                f"current test {self.holder or '-'} for {age:.0f} s")

    def owner_alive(self) -> bool:
        return running(self.host, self.owner_pid, self.owner_proc)


def load_record(path: Path, warn: Callable[[str], None] = lambda _text: None) -> RunRecord | None:
    """The record at ``path``; None when missing, or when torn, hand-edited or not a record
    (then the guest counts as unowned, and ``warn`` says so once): never a crash."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        warn(f"kvmsnap: ignoring run record {path}: cannot read it ({exc.strerror or exc})")
        return None
    try:
        data = json.loads(raw.decode())  # UnicodeDecodeError is a ValueError too
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("clone_source") is not None:
            data["clone_source"] = CloneSource(**_checked(CloneSource, data["clone_source"]))
        return RunRecord(**_checked(RunRecord, data))
    except (ValueError, TypeError, AttributeError) as exc:
        warn(f"kvmsnap: ignoring run record {path}: it is damaged or not pytest-kvmsnap's ({exc}); "
             "the guest it names counts as unowned")
        return None


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),),
    "dict": (dict,), "list": (list,), "tuple": (list,), "CloneSource": (dict, CloneSource),
}


def _checked(kind: type, data: object) -> dict[str, Any]:
    """``data`` if each field has the JSON type its annotation says (the outer type only)."""
    if not isinstance(data, dict):
        raise ValueError(f"{kind.__name__} is not a JSON object")
    known = {f.name: f.type for f in fields(kind)}
    for name, value in data.items():
        if name not in known:
            raise ValueError(f"unknown field {name!r}")
        allowed = tuple(t for part in str(known[name]).split("|")
                        for t in _JSON_TYPES[part.strip().split("[")[0]])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ValueError(f"field {name!r} is {type(value).__name__}")
    return data
