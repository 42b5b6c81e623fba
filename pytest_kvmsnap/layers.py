"""Layered baselines: the guest state that wider-scoped fixtures built, kept as snapshots.

pytest sets a test's fixtures up widest scope first and keeps the wider ones
across tests.  A fixture *wider than the test's unit* (its revert scope) that
sets up on a guest builds state every later test of its scope expects, so its
work must survive the unit's reverts.  The plugin *checkpoints* the guest once
such fixtures have set up, before anything narrower does: the checkpoint is a
*layer*, and the unit's reverts go to the top layer.  When a fixture of a layer
is torn down the layer *ends*: the guest's next revert goes to the layer below,
and the layer's snapshot is deleted.

Layers decide *where* a revert goes; the revert mode still decides *when*.
Each process keeps its own layers (pytest keeps fixtures per process), so an
xdist worker never starts from another worker's layer.

Pure decisions and bookkeeping: no pytest, no engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pytest_kvmsnap.config import SCOPES


def rank(scope: str) -> int:
    return SCOPES.index(scope)


def is_wider(fixture_scope: str, unit_scope: str) -> bool:
    """Does a fixture of ``fixture_scope`` outlive a unit of ``unit_scope`` (so its work is a layer)?"""
    return rank(fixture_scope) > rank(unit_scope)


def layer_name(baseline: str, worker: str, number: int) -> str:
    """A layer's snapshot: the run's baseline name, the process, a number unique in the process."""
    return f"{baseline}-{worker}-L{number}"


@dataclass(frozen=True)
class Fixture:
    """A fixture instance that set up on the guests: ``key`` names it until it is torn down."""

    key: int
    name: str
    scope: str


@dataclass
class Layer:
    snapshot: str
    fixtures: tuple[Fixture, ...]
    ended: bool = False
    kept: bool = False  # a guest setup kept for later runs (reuse.py): never deleted when it ends

    def describe(self) -> str:
        return ", ".join(f"{f.scope} fixture {f.name!r}" for f in self.fixtures)


@dataclass
class LayerStack:
    """One guest's layers in this process, lowest first, on ``base`` (the run's baseline or the
    user's ``snapshot=``)."""

    base: str = ""
    layers: list[Layer] = field(default_factory=list)

    def top(self, base: str) -> str:
        """The snapshot a unit on ``base`` reverts to: the highest live layer, else ``base``."""
        live = [layer for layer in self.layers if not layer.ended]
        return live[-1].snapshot if live else base

    def conflict(self, base: str) -> Layer | None:
        """A live layer built on another base than ``base``: a unit on ``base`` cannot keep it."""
        live = [layer for layer in self.layers if not layer.ended]
        return live[0] if live and self.base != base else None

    def push(self, base: str, layer: Layer) -> None:
        self.base = base if not self.layers else self.base
        self.layers.append(layer)

    def end(self, key: int) -> list[Layer]:
        """Fixture ``key`` was torn down: its layer ends, and every layer above it (they were taken
        on top of its state).  The layers that ended now."""
        hit = next((i for i, layer in enumerate(self.layers) if any(f.key == key for f in layer.fixtures)), None)
        if hit is None:
            return []
        ended = [layer for layer in self.layers[hit:] if not layer.ended]
        for layer in ended:
            layer.ended = True
        return ended

    def take_ended(self) -> list[Layer]:
        """Remove the ended layers (their snapshots are to be deleted), highest first."""
        ended = [layer for layer in reversed(self.layers) if layer.ended]
        self.layers = [layer for layer in self.layers if not layer.ended]
        return ended

    def keys(self) -> set[int]:
        return {f.key for layer in self.layers if not layer.ended for f in layer.fixtures}


def carried_away(ended: list[Layer], key: int) -> list[Fixture]:
    """Fixtures still set up whose state went with layers that ended because fixture ``key`` did.

    A fixture first set up after a narrower-lived one (a session fixture first
    used after a module fixture) is layered on top of that one's state; when the
    narrower one ends, so does its layer.  Its cached value is still served to
    later tests, but its work on the guest is gone.
    """
    return [f for layer in ended for f in layer.fixtures if f.key != key]
