"""Per-run objects kept in ``config.stash`` (pytest's public API for plugin state)."""

from __future__ import annotations

import uuid

import pytest

from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.manager import GuestManager
from pytest_kvmsnap.markers import Spec

SETTINGS_KEY = pytest.StashKey[Settings]()
MANAGER_KEY = pytest.StashKey[GuestManager]()
PROBLEMS_KEY = pytest.StashKey[list[str]]()
SPEC_KEY = pytest.StashKey[Spec | None]()


def run_id(config: pytest.Config) -> str:
    """One id for the whole run: xdist's testrunuid on workers, else a new one."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput and workerinput.get("testrunuid"):
        return str(workerinput["testrunuid"])[:12]
    return uuid.uuid4().hex[:12]


def manager_for(config: pytest.Config) -> GuestManager:
    """The run's manager, created on first need so unused runs touch no hypervisor."""
    if MANAGER_KEY not in config.stash:
        manager = GuestManager(config.stash[SETTINGS_KEY], run_id(config))
        manager.listener = _hook_caller(config)
        config.stash[MANAGER_KEY] = manager
    return config.stash[MANAGER_KEY]


def _hook_caller(config: pytest.Config):  # type: ignore[no-untyped-def]
    def call(kind: str, domain: str, snapshot: str, seconds: float, method: str, reason: str) -> None:
        if kind == "baseline":
            config.hook.pytest_kvmsnap_baseline(config=config, domain=domain, snapshot=snapshot,
                                                seconds=seconds)
        else:
            config.hook.pytest_kvmsnap_reverted(config=config, domain=domain, snapshot=snapshot,
                                                seconds=seconds, method=method, reason=reason)
    return call
