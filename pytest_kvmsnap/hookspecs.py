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

    ``method`` is ``inplace``, ``libvirt`` or ``libvirt-fallback`` (an in-place
    load failed and libvirt's revert was used); ``reason`` says which unit edge
    or request caused it.
    """
