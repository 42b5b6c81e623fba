"""``pytest --kvm-cleanup [--kvm-dry-run]``: repair what dead runs left, run no tests.

A run killed with ``kill -9`` leaves its baseline snapshot (the guest is then
in whatever state its last test left) and its run record.  The next run that
uses the guest repairs it anyway; this command does it on demand, for the
configured guests (``--kvm-domain`` / ``kvm_domains``) or every guest at the URI.
Only snapshots whose ownership record names a dead run of this plugin are
touched; everything else is listed at most.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pytest_kvmsnap.config import Settings, resolve
from pytest_kvmsnap.coordinator import Coordinator
from pytest_kvmsnap.engine import EngineKind
from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.session import engine_kind, lock_dir, run_id

CLEANUP_HELP = ("list and repair what killed runs left (orphan snapshots of dead runs: the guest "
                "is restored to the oldest and they are deleted; stale run records; lock files of guests "
                "that no longer exist), then exit "
                "without running tests.")
DRY_RUN_HELP = "with --kvm-cleanup: only list what would be repaired."
KEEP_SETUPS_HELP = ("with --kvm-cleanup: list the guest setups kept for later runs (@guest_setup) but do not "
                    "delete them (by default they are deleted).")


def add_cleanup_options(group: pytest.OptionGroup) -> None:
    group.addoption("--kvm-cleanup", action="store_true", dest="kvm_cleanup", help=CLEANUP_HELP)
    group.addoption("--kvm-dry-run", action="store_true", dest="kvm_dry_run", help=DRY_RUN_HELP)
    group.addoption("--kvm-keep-setups", action="store_true", dest="kvm_keep_setups", help=KEEP_SETUPS_HELP)


def run_cleanup(config: pytest.Config) -> int:
    """Print one line per guest and per stale record, for each hypervisor of the pool; exit 1 if
    anything could not be done (a host that cannot be reached is one line, and skipped)."""
    dry_run = bool(config.getoption("kvm_dry_run"))
    try:
        settings = resolve(config)
        directory = lock_dir(settings)
    except KvmSnapError as exc:
        print(f"kvmsnap: {exc}")
        return pytest.ExitCode.USAGE_ERROR
    pooled = len(settings.pool) > 1
    kind = engine_kind(config)
    keep = bool(config.getoption("kvm_keep_setups"))
    results = [_clean_host(dataclasses.replace(settings, uri=uri, uris=(uri,)), run_id(config), directory,
                           (dry_run, keep), pooled, kind) for uri in settings.pool]
    if all(result is None for result in results):
        return pytest.ExitCode.USAGE_ERROR  # no host could be reached
    coordinator = Coordinator(settings, run_id(config), directory, engine_kind=kind)  # the lock directory's records
    for line in coordinator.recovery.stale_records(dry_run):
        print(f"  {line}")
    coordinator.finish()
    return pytest.ExitCode.TESTS_FAILED if any(results) else pytest.ExitCode.OK


def _clean_host(settings: Settings, run: str, directory: Path, how: tuple[bool, bool], pooled: bool,
                kind: EngineKind | None) -> bool | None:
    """Clean one hypervisor: True if something could not be done, None if it could not be reached.
    ``how``: (dry run, keep the kept guest setups)."""
    dry_run, keep = how
    coordinator = Coordinator(settings, run, directory, engine_kind=kind)
    try:
        engine = coordinator.hypervisor.engine()
        names = settings.domains or sorted(name for name in engine.guest_names() if not engine.leases.is_lease(name))
    except KvmSnapError as exc:
        print(f"kvmsnap: {settings.uri} skipped: {exc}" if pooled else f"kvmsnap: {exc}")
        coordinator.finish()
        return None
    print(f"kvmsnap cleanup at {settings.uri}{' (dry run: nothing is changed)' if dry_run else ''}")
    failed = False
    for name in names:
        try:
            lines = coordinator.recovery.cleanup(name, dry_run)
            setups = coordinator.recovery.cleanup_setups(name, dry_run, keep)
            lines = (lines if setups == [] or lines != [f"{name}: nothing to clean"] else []) + setups
        except (KvmSnapError, coordinator.hypervisor.kind.refusal) as exc:
            lines, failed = [f"{name}: could not clean: {exc}"], True
        for line in lines:
            print(f"  {line}")
    for line in coordinator.recovery.unused_locks(dry_run):
        print(f"  {line}")
    coordinator.finish()
    return failed
