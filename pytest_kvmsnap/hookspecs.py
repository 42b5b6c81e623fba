"""Hooks pytest-kvmsnap calls; implement them in a conftest.py or a plugin."""

from __future__ import annotations

import pytest


@pytest.hookspec
def pytest_kvmsnap_baseline(config: pytest.Config, domain: str, snapshot: str, seconds: float) -> None:
    """Called after the run's baseline snapshot of guest ``domain`` was taken."""


@pytest.hookspec
def pytest_kvmsnap_reverted(
    config: pytest.Config, domain: str, snapshot: str, seconds: float, method: str, reason: str
) -> None:
    """Called after guest ``domain`` went back to ``snapshot``.

    ``method`` is ``inplace`` (the snapshot loaded into the running VM process),
    ``restart`` (the engine's own revert: a new VM process from the snapshot) or
    ``restart-fallback`` (an in-place load failed, so a restart was used); before
    0.x's rename of the engine's words, ``restart`` was reported as ``libvirt``.
    ``reason`` says which unit edge or request caused it.
    """


@pytest.hookspec
def pytest_kvmsnap_before_revert(config: pytest.Config, domain: str, snapshot: str, reason: str) -> None:
    """Called just before guest ``domain`` goes back to ``snapshot``.

    An in-place revert rewinds the guest's TCP state: drop cached SSH, testinfra
    or paramiko connections here (or compare ``kvm_guest.generation``).
    """


@pytest.hookspec
def pytest_kvmsnap_after_revert(config: pytest.Config, domain: str, generation: int, seconds: float,
                                steps: tuple[str, ...]) -> None:
    """Called when guest ``domain`` is usable again after the baseline or a revert.

    ``generation`` counts the guest's reverts in this run; ``seconds`` is the time
    the ``steps`` took after the revert itself ("clock", "reseed", and the
    --kvm-wait kind), before the next test's fixtures.
    """


@pytest.hookspec(firstresult=True)
def pytest_kvmsnap_ready(config: pytest.Config, guest: object, timeout: float) -> object:
    """With --kvm-wait=hook: return once ``guest`` (a :class:`pytest_kvmsnap.Guest`) is
    ready for the next test, or raise.  ``timeout`` is what is left of --kvm-wait-timeout."""


@pytest.hookspec(firstresult=True)
def pytest_kvmsnap_engine(config: pytest.Config) -> object:
    """Return the engine kind (a :class:`pytest_kvmsnap.engine.EngineKind`) that the run's
    ``--kvm-uri`` values name, for a hypervisor other than libvirt; None (the default): libvirt.

    A plugin for another engine implements it (``docs/backends.md`` says what an engine must do).
    """
