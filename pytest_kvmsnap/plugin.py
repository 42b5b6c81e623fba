"""pytest-kvmsnap's hooks: settings, collection, per-test reverts and the summary.

The work happens in hooks, not in an autouse fixture, so that a guest is
reverted *before* any fixture of the test's unit sets up and *after* every one
of them has torn down, and so that the marker alone is enough.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Generator

import pytest

from pytest_kvmsnap import hookspecs
from pytest_kvmsnap.config import add_options, resolve
from pytest_kvmsnap.exceptions import ConfigError, KvmSnapError
from pytest_kvmsnap.fixtures import kvm_connection, kvm_guest, kvm_guests
from pytest_kvmsnap.guest import summary
from pytest_kvmsnap.locking import GuestLock
from pytest_kvmsnap.manager import GuestManager
from pytest_kvmsnap.markers import MARKER_HELP, Spec, spec_for, unit_key
from pytest_kvmsnap.state import (
    MANAGER_KEY,
    PROBLEMS_KEY,
    SETTINGS_KEY,
    SPEC_KEY,
    WORKER_OWNER,
    WORKER_RUN,
    is_worker,
    lock_dir,
    lock_dir_path,
    manager_for,
    run_id,
)

__all__ = ["kvm_connection", "kvm_guest", "kvm_guests"]


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        config.stash[SETTINGS_KEY] = resolve(config)
    except ConfigError as exc:
        raise pytest.UsageError(f"kvmsnap: {exc}") from None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Resolve every test's spec now, so bad marker arguments stop the run at once."""
    settings = config.stash[SETTINGS_KEY]
    errors = []
    for item in items:
        try:
            item.stash[SPEC_KEY] = spec_for(item, settings)
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise pytest.UsageError("kvmsnap: invalid kvm_snapshot usage:\n  " + "\n  ".join(errors))
    _check_distribution(config, items)


# xdist modes that keep every test of one module (and class) on one worker.
_KEEPS_MODULES = ("loadscope", "loadfile", "loadgroup", "no")


def _check_distribution(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Units larger than one test must run on one worker: group them, or refuse."""
    dist = config.getoption("dist", "no") if is_worker(config) else "no"
    for item in items:
        spec = item.stash.get(SPEC_KEY, None)
        if spec is None or spec.scope == "function":
            continue
        # Under --dist loadgroup this puts a whole unit on one worker.
        item.add_marker(pytest.mark.xdist_group(name=f"kvmsnap-{unit_key(item, spec.scope)}"))
        if dist == "loadgroup" or (dist in _KEEPS_MODULES and spec.scope in ("class", "module")):
            continue
        raise pytest.UsageError(
            f"kvmsnap: {item.nodeid} uses scope={spec.scope!r}, whose tests must run on one xdist "
            f"worker, but --dist {dist} spreads them. Use --dist loadgroup (pytest-kvmsnap groups "
            "each unit), or --dist loadscope for class and module scopes."
        )


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """xdist controller: give every worker this run's id and the owner's pid."""
    workerinput = node.workerinput  # type: ignore[attr-defined]
    workerinput[WORKER_RUN] = run_id(node.config)  # type: ignore[attr-defined]
    workerinput[WORKER_OWNER] = os.getpid()


def _spec(item: pytest.Item) -> Spec | None:
    return item.stash.get(SPEC_KEY, None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    spec = _spec(item)
    if spec is None:
        return
    try:
        manager_for(item.config).start_test(spec, unit_key(item, spec.scope), item.nodeid)
    except KvmSnapError as exc:
        pytest.fail(f"kvmsnap: {exc}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    spec = _spec(item)
    if spec is not None and report.failed and MANAGER_KEY in item.config.stash:
        item.config.stash[MANAGER_KEY].record_failure(spec.domains)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    spec = _spec(item)
    if spec is None or MANAGER_KEY not in item.config.stash:
        return (yield)
    manager = item.config.stash[MANAGER_KEY]
    try:
        result = yield
    except BaseException:
        manager.record_failure(spec.domains)  # a fixture's teardown failed
        _end_test(manager, spec, nextitem, quiet=True)
        raise
    _end_test(manager, spec, nextitem, quiet=False)
    return result


def _end_test(manager: GuestManager, spec: Spec, nextitem: pytest.Item | None, quiet: bool) -> None:
    try:
        manager.end_test(spec, _next_units(nextitem))
    except KvmSnapError as exc:
        if not quiet:  # else the teardown's own error is already being reported
            pytest.fail(f"kvmsnap: {exc}", pytrace=False)


def _next_units(nextitem: pytest.Item | None) -> dict[str, str | None]:
    spec = _spec(nextitem) if nextitem is not None else None
    if nextitem is None or spec is None:
        return {}
    key = unit_key(nextitem, spec.scope)
    return {name: key for name in spec.domains}


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Restore every guest the run touched; a failure here fails the run.

    Under xdist the controller does it, after every worker is done, since only
    then is the run's last user of each guest known.
    """
    config = session.config
    manager = config.stash.get(MANAGER_KEY, None)
    if manager is None and not is_worker(config) and _run_has_records(config):
        manager = manager_for(config)
    if manager is None:
        return
    problems = manager.finish()
    session.config.stash[PROBLEMS_KEY] = problems
    if problems and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    manager = config.stash.get(MANAGER_KEY, None)
    if manager is None or is_worker(config):
        return
    tr = terminalreporter
    tr.section("kvmsnap")
    verbose = config.get_verbosity() > 0
    for note in manager.notes:
        tr.write_line(note)
    for record in manager.finished:
        tr.write_line(summary(record))
        for snapshot, how in sorted(record.notes.items()):
            tr.write_line(f"  revert method for {snapshot}: {how}")
        for seconds, method, target, reason in record.reverts if verbose else ():
            tr.write_line(f"  {float(seconds):7.3f} s  {method:16} -> {target}  ({reason})")
    for problem in config.stash.get(PROBLEMS_KEY, []):
        tr.write_line(f"kvmsnap: could not restore {problem}", red=True, bold=True)
    all_times = [t for record in manager.finished for t in record.revert_times()]
    if all_times:
        tr.write_line(f"kvmsnap: {len(all_times)} revert(s), median {statistics.median(all_times):.3f} s")


def _run_has_records(config: pytest.Config) -> bool:
    """Did this run's workers use a guest? Asked at every session end, so create nothing."""
    settings = config.stash[SETTINGS_KEY]
    if not lock_dir_path(settings).is_dir():
        return False
    try:
        directory = lock_dir(settings)
    except KvmSnapError:
        return False
    own = run_id(config)
    return any(r.run_id == own for r in GuestLock.records(directory))
