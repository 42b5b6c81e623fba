"""The records the plugin writes on a hypervisor, as text any engine can keep.

Every snapshot and clone the plugin creates carries an :class:`Owner` in its
description; a state kept for the user carries a kept mark instead; a run's
lease is a :class:`LeaseRecord`.  Ownership lives inside the thing itself, so a
run that finds it (on any host, through any engine) can tell whose it is.
Plain values only: no engine, no pytest.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

OWNER = "pytest-kvmsnap"
_DESCRIPTION_TAG = "pytest-kvmsnap baseline "
# A snapshot kept for the user carries this tag, never the baseline's: recovery,
# cleanup and rival detection look only for the baseline tag, so nothing the
# plugin does ever removes or reverts to a kept snapshot.
_KEPT_TAG = "pytest-kvmsnap kept for the user "
_LEASE_TAG = "pytest-kvmsnap lease: "
# A guest setup kept for later runs (reuse.py) carries this tag: no run's, so recovery
# never reverts to it or deletes it; only a run with its key reverts to it.
_SETUP_TAG = "pytest-kvmsnap guest setup "
MARK = "-kvmsnap-"  # in the names of a run's clones and pools of copies: <guest>-kvmsnap-<run>[-<slot>]
KEPT_MARK = "-kept-"


def clone_name(domain: str, run_id: str, slot: int) -> str:
    return f"{domain}{MARK}{run_id}-{slot}"


def kept_clone_name(clone: str) -> str:
    """The shut-off guest a clone with kept failed states becomes after the run: not a
    clone's name (recovery looks for those), and the same in every process of the run."""
    return clone.replace(MARK, KEPT_MARK, 1)


@dataclass(frozen=True)
class Owner:
    """The record every snapshot the plugin creates carries in its description."""

    run_id: str
    pid: int
    host: str
    started: float
    proc: str = ""  # the owner process's token (processes.process_token): a reused pid is not it
    # 0 on a run's baseline; n on the n-th layer above it (layers.py).  Recovery
    # restores a dead run's lowest snapshot, its baseline, whatever it left above.
    layer: int = field(default=0, compare=False)

    def to_json(self) -> str:
        data = {"owner": OWNER, "run": self.run_id, "pid": self.pid, "host": self.host, "started": self.started,
                "proc": self.proc}
        return json.dumps({**data, "layer": self.layer} if self.layer else data)

    @classmethod
    def from_description(cls, text: str | None) -> Owner | None:
        if not text or not text.startswith(_DESCRIPTION_TAG):
            return None
        return cls.from_json(text[len(_DESCRIPTION_TAG):])

    @classmethod
    def from_json(cls, text: str) -> Owner | None:
        try:
            data = json.loads(text)
            if data.get("owner") != OWNER:
                return None
            return cls(str(data["run"]), int(data["pid"]), str(data["host"]),
                       float(data["started"]), str(data.get("proc", "")), int(data.get("layer", 0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def _tagged(text: str | None, tag: str) -> dict[str, Any] | None:
    """The JSON object a description holds after ``tag``; None if it has no such tag or object."""
    if not text or not text.startswith(tag):
        return None
    try:
        data = json.loads(text[len(tag):])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def owner_description(owner: Owner) -> str:
    """The text that marks a snapshot or clone domain as this plugin's."""
    return _DESCRIPTION_TAG + owner.to_json()


def is_damaged(description: str) -> bool:
    """Starts like the plugin's record but does not parse (hand-edited, cut short): it counts
    as the user's, and is never reverted to or deleted."""
    return description.startswith(_DESCRIPTION_TAG) and Owner.from_description(description) is None


def kept_description(record: dict[str, Any]) -> str:
    """The mark of a snapshot (or a clone's domain) kept for the user."""
    return _KEPT_TAG + json.dumps({"owner": OWNER, **record})


def kept_records(described: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """From (name, description) pairs, the records of those kept for the user, with their names."""
    found = []
    for name, text in described:
        record = _tagged(text, _KEPT_TAG)
        if record is not None and record.get("owner") == OWNER:
            found.append({**record, "name": name})
    return found


@dataclass(frozen=True)
class SetupRecord:
    """What a kept guest setup's snapshot says: the key it was built under, the fixture's
    return value (JSON text), when and by which run."""

    key: str
    fixture: str
    variant: str  # the fixture's parameter, if any: variants are kept side by side
    value: str
    created: float
    run_id: str

    def to_description(self) -> str:
        return _SETUP_TAG + json.dumps({"owner": OWNER, **dataclasses.asdict(self)})

    @classmethod
    def from_description(cls, text: str | None) -> SetupRecord | None:
        data = _tagged(text, _SETUP_TAG)
        if data is None or data.get("owner") != OWNER:
            return None
        try:
            return cls(str(data["key"]), str(data["fixture"]), str(data["variant"]), str(data["value"]),
                       float(data["created"]), str(data["run_id"]))
        except (ValueError, KeyError, TypeError):
            return None


class Taken(Exception):
    """Another host defined or took over the lease first."""


@dataclass(frozen=True)
class LeaseRecord:
    """A run's claim on a guest: who holds it, until when."""

    guest: str
    holder: Owner
    expires: float  # seconds since the epoch, by the holder's clock

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires

    def describe(self) -> str:
        """'run R (pid P on host H), lease until 12:00:00 UTC' for wait and error lines."""
        until = time.strftime("%H:%M:%S UTC", time.gmtime(self.expires))
        holder = self.holder
        return f"run {holder.run_id} (pid {holder.pid} on {holder.host}), its lease on the hypervisor until {until}"

    def to_description(self) -> str:
        return _LEASE_TAG + json.dumps({"guest": self.guest, "expires": self.expires,
                                        "holder": json.loads(self.holder.to_json())})

    @classmethod
    def from_description(cls, text: str | None) -> LeaseRecord | None:
        data = _tagged(text, _LEASE_TAG)
        if data is None:
            return None
        try:
            holder = Owner.from_json(json.dumps(data["holder"]))
            if holder is None:
                return None
            return cls(str(data["guest"]), holder, float(data["expires"]))
        except (ValueError, KeyError, TypeError):
            return None
