"""pytest-kvmsnap's hooks: settings, collection, per-test reverts and the summary.

The work happens in hooks, not in an autouse fixture, so that a guest is
reverted *before* any fixture of the test's unit sets up and *after* every one
of them has torn down, and so that the marker alone is enough.
"""

from __future__ import annotations

import statistics
from collections.abc import Generator

import pytest

from pytest_kvmsnap import hookspecs
from pytest_kvmsnap.config import add_options, resolve
from pytest_kvmsnap.exceptions import ConfigError, KvmSnapError
from pytest_kvmsnap.fixtures import kvm_connection, kvm_guest, kvm_guests
from pytest_kvmsnap.markers import MARKER_HELP, Spec, spec_for, unit_key
from pytest_kvmsnap.state import MANAGER_KEY, PROBLEMS_KEY, SETTINGS_KEY, SPEC_KEY, manager_for

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


def _spec(item: pytest.Item) -> Spec | None:
    return item.stash.get(SPEC_KEY, None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    spec = _spec(item)
    if spec is None:
        return
    try:
        manager_for(item.config).start_test(spec, unit_key(item, spec.scope))
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


def _end_test(manager: object, spec: Spec, nextitem: pytest.Item | None, quiet: bool) -> None:
    from pytest_kvmsnap.manager import GuestManager

    assert isinstance(manager, GuestManager)
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
    """Restore every guest the run touched; a failure here fails the run."""
    manager = session.config.stash.get(MANAGER_KEY, None)
    if manager is None:
        return
    problems = manager.finish()
    session.config.stash[PROBLEMS_KEY] = problems
    if problems and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    manager = config.stash.get(MANAGER_KEY, None)
    if manager is None:
        return
    tr = terminalreporter
    tr.section("kvmsnap")
    verbose = config.get_verbosity() > 0
    for state in manager.states():
        tr.write_line(state.summary())
        for snapshot, note in sorted(state.method_notes.items()):
            tr.write_line(f"  revert method for {snapshot}: {note}")
        for event in state.reverts if verbose else ():
            tr.write_line(f"  {event.seconds:7.3f} s  {event.method:16} -> {event.target}  ({event.reason})")
    for problem in config.stash.get(PROBLEMS_KEY, []):
        tr.write_line(f"kvmsnap: could not restore {problem}", red=True, bold=True)
    all_times = [t for s in manager.states() for t in s.revert_seconds]
    if all_times:
        tr.write_line(f"kvmsnap: {len(all_times)} revert(s), median {statistics.median(all_times):.3f} s")
