"""pytest-kvmsnap's hooks: settings, collection, per-test reverts and the summary.

The work happens in hooks, not in an autouse fixture, so that a guest is
reverted *before* any fixture of the test's unit sets up and *after* every one
of them has torn down, and so that the marker alone is enough.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from pytest_kvmsnap import hookspecs
from pytest_kvmsnap.cleanup import add_cleanup_options, run_cleanup
from pytest_kvmsnap.clients import drop_testinfra_connections
from pytest_kvmsnap.config import Settings, add_options, resolve
from pytest_kvmsnap.coordinator import Coordinator
from pytest_kvmsnap.exceptions import ConfigError, KvmSnapError
from pytest_kvmsnap.fixtures import (
    kvm_connection,
    kvm_fabric,
    kvm_guest,
    kvm_guest_factory,
    kvm_guests,
    kvm_ssh,
    kvm_testinfra,
)
from pytest_kvmsnap.guest import summary
from pytest_kvmsnap.locking import GuestLock
from pytest_kvmsnap.markers import MARKER, MARKER_HELP, Spec, spec_for, unit_key
from pytest_kvmsnap.reports import RUN_FIGURES_KEY, RunFigures, attach_evidence, with_artifacts_dir, write_summary
from pytest_kvmsnap.session import (
    COORDINATOR_KEY,
    CURRENT_KEY,
    EVIDENCE_KEY,
    PREPARED_KEY,
    PROBLEMS_KEY,
    PROTECTED_KEY,
    SETTINGS_KEY,
    SSH_GUESTS_KEY,
    WORKER_DIST,
    WORKER_OWNER,
    WORKER_RUN,
    coordinator_for,
    distribution_refusal,
    hand_notices_back,
    is_worker,
    lock_dir,
    lock_dir_path,
    notices_for_summary,
    run_id,
    ssh_guests,
    take_notices,
    worker_dist,
)
from pytest_kvmsnap.setups import current_layering, fixture_setup, or_fail

__all__ = ["kvm_connection", "kvm_fabric", "kvm_guest", "kvm_guest_factory", "kvm_guests", "kvm_ssh", "kvm_testinfra"]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Every option: the settings table's, and the cleanup command's actions."""
    add_options(parser)
    add_cleanup_options(parser.getgroup("kvmsnap"))


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    if config.getoption("kvm_cleanup"):
        return run_cleanup(config)
    if config.getoption("kvm_dry_run"):
        raise pytest.UsageError("kvmsnap: --kvm-dry-run only goes with --kvm-cleanup")
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        config.stash[SETTINGS_KEY] = with_artifacts_dir(resolve(config), config)
    except ConfigError as exc:
        raise pytest.UsageError(f"kvmsnap: {exc}") from None
    for line in config.stash[SETTINGS_KEY].deprecated:
        config.issue_config_time_warning(pytest.PytestDeprecationWarning(f"kvmsnap: {line}"), stacklevel=2)
    # A plugin object: it sees every report, the workers' too on xdist's controller.
    config.stash[RUN_FIGURES_KEY] = RunFigures()
    config.pluginmanager.register(config.stash[RUN_FIGURES_KEY], "kvmsnap-run-figures")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Generator[None]:
    """Group units for xdist first; check every marker last, however it was added.

    Before the other implementations run, the units known from decorators and
    ``pytestmark`` get their ``xdist_group`` (xdist's worker reads those in its
    own implementation).  After all of them -- a conftest's plain hook is
    pytest's documented way to mark a directory -- every test's spec is
    resolved, so bad marker arguments from anywhere stop the run at once.
    """
    settings = config.stash[SETTINGS_KEY]
    for item in items:
        spec = _spec_or_none(item, settings)
        if spec is not None and spec.scope != "function":
            # Under --dist loadgroup this puts a whole unit on one worker.
            item.add_marker(pytest.mark.xdist_group(name=f"kvmsnap-{unit_key(item, spec.scope)}"))
    result = yield
    errors, specs = [], []
    for item in items:
        try:
            spec = spec_for(item, settings)
            if spec is not None:
                specs.append((spec, list(getattr(item, "fixturenames", []))))
        except ConfigError as exc:
            errors.append(str(exc))
    config.stash[SSH_GUESTS_KEY] = ssh_guests(specs, settings)
    if errors:
        raise pytest.UsageError("kvmsnap: invalid kvm_snapshot usage:\n  " + "\n  ".join(errors))
    _check_ready_hook(config, items)
    return result


def _check_ready_hook(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--kvm-wait=hook without an implementation: refused now, before any guest is touched.

    Not at configure time: a conftest.py below the root registers its hooks
    during collection, which is over here.
    """
    settings = config.stash[SETTINGS_KEY]
    if settings.wait.kind != "hook" or config.pluginmanager.hook.pytest_kvmsnap_ready.get_hookimpls():
        return
    if any(_spec_or_none(item, settings) is not None for item in items):
        raise pytest.UsageError("kvmsnap: --kvm-wait=hook, but no pytest_kvmsnap_ready(config, guest, timeout) "
                                "hook is implemented: add one to a conftest.py or a plugin, or choose another "
                                "--kvm-wait")


def _current_spec(item: pytest.Item) -> Spec | None:
    """The spec of the marker ``item`` carries now; a bad one added late fails the test."""
    try:
        return spec_for(item, item.config.stash[SETTINGS_KEY])
    except ConfigError as exc:
        pytest.fail(f"kvmsnap: {exc}", pytrace=False)


def _spec_or_none(item: pytest.Item, settings: Settings) -> Spec | None:
    try:
        return spec_for(item, settings)
    except ConfigError:
        return None  # reported with all the others once collection is done


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    take_notices(node.config, node)  # node: xdist's WorkerController


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """xdist controller: give every worker this run's id and the owner's pid."""
    workerinput = node.workerinput  # type: ignore[attr-defined]
    workerinput[WORKER_RUN] = run_id(node.config)  # type: ignore[attr-defined]
    workerinput[WORKER_OWNER] = os.getpid()
    workerinput[WORKER_DIST] = node.config.getoption("dist", "no")  # type: ignore[attr-defined]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Protect the test's guests before any of its fixtures set up, or error it.

    The spec is read from the test's markers *now*, so a marker added after
    collection counts too.  Not ``tryfirst``: a conftest's own setup hook may
    still add the marker, and pytest's fixture setup (which ours must precede)
    is an older, plain implementation that runs after ours.
    """
    config = item.config
    spec = _current_spec(item)
    if spec is None:
        return
    refused = distribution_refusal(item, spec, worker_dist(config))
    if refused:
        pytest.fail(f"kvmsnap: {refused}", pytrace=False)
    item.stash[PREPARED_KEY] = spec  # from here on, teardown ends what setup began
    # Inside or_fail: the first test creates the coordinator, whose lock
    # directory may be refused; that is one line too, not a traceback.
    or_fail(lambda: coordinator_for(config).start_test(spec, unit_key(item, spec.scope), item.nodeid))
    item.stash[PROTECTED_KEY] = True
    config.stash[CURRENT_KEY] = item  # for the layers its fixtures build, and kvm_guest_factory
    or_fail(lambda: coordinator_for(config).layering.check_fixtures(list(getattr(item, "fixturenames", []))))


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any],
                         request: pytest.FixtureRequest) -> Generator[None, Any, Any]:
    """Layers and kept guest setups (setups.py)."""
    return (yield from fixture_setup(fixturedef, request))


def pytest_fixture_post_finalizer(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> None:
    """A torn-down fixture ends the layers it built (the guest leaves them at the unit's edge)."""
    coordinator = request.config.stash.get(COORDINATOR_KEY, None)
    if coordinator is not None:
        coordinator.layering.fixture_ended(id(fixturedef))


def pytest_kvmsnap_reverted(config: pytest.Config, domain: str) -> None:
    """pytest-testinfra's cached connections (its --hosts fixture's too) are rewound: drop them."""
    drop_testinfra_connections()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """The last check before the test body: a marker added during setup (a fixture's
    ``request.applymarker``, a late hook) that asks for guests, or for other
    terms, than setup prepared would run the test unprotected, so error."""
    spec = _current_spec(item)
    prepared = item.stash.get(PREPARED_KEY, None) if item.stash.get(PROTECTED_KEY, False) else None
    if spec is not None and spec != prepared:
        pytest.fail(f"kvmsnap: {item.nodeid} was marked {MARKER} after its setup began (by a fixture or "
                    "a late hook), so its guests were not prepared; mark it at collection instead "
                    "(a decorator, pytestmark, or a conftest's pytest_collection_modifyitems)", pytrace=False)
    layering = current_layering(item.config)
    if layering is not None:  # wider fixtures set up and nothing narrower did: checkpoint before the body
        coordinator, spec, _item = layering
        or_fail(lambda: coordinator.layering.before_setup(spec, "function", item.nodeid))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test marks its guests' units failed and, once, gets their evidence attached:
    now, before its teardown reverts them."""
    report = yield
    spec = item.stash.get(PREPARED_KEY, None)
    if spec is None or not report.failed or COORDINATOR_KEY not in item.config.stash:
        return report
    coordinator = item.config.stash[COORDINATOR_KEY]
    coordinator.record_failure(spec.domains)
    if not item.stash.get(EVIDENCE_KEY, False):
        item.stash[EVIDENCE_KEY] = True
        settings = coordinator.settings
        artifacts = Path(settings.artifacts) if settings.artifacts else None
        if artifacts is not None:
            artifacts.mkdir(parents=True, exist_ok=True)
        attach_evidence(item, report, coordinator.failure_evidence(spec.domains, item.nodeid, artifacts),
                        show_lines=settings.console_lines > 0)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    spec = item.stash.get(PREPARED_KEY, None)
    if spec is None or COORDINATOR_KEY not in item.config.stash:
        return (yield)
    coordinator = item.config.stash[COORDINATOR_KEY]
    try:
        result = yield
    except BaseException:
        coordinator.record_failure(spec.domains)  # a fixture's teardown failed
        _end_test(item, coordinator, spec, nextitem, quiet=True)
        raise
    finally:
        item.config.stash[CURRENT_KEY] = None
    _end_test(item, coordinator, spec, nextitem, quiet=False)
    return result


def _end_test(item: pytest.Item, coordinator: Coordinator, spec: Spec, nextitem: pytest.Item | None,
              quiet: bool) -> None:
    try:
        or_fail(lambda: coordinator.end_test(spec, _next_units(coordinator.settings, nextitem), item.nodeid),
                quiet)
    finally:  # before pytest makes the teardown report, which JUnit XML takes them from
        item.user_properties.extend(p for figures in coordinator.figures.values() for p in figures.properties())


def _next_units(settings: Settings, nextitem: pytest.Item | None) -> dict[str, str | None]:
    """The next test's unit per guest, from its markers now (they may change until its setup)."""
    spec = _spec_or_none(nextitem, settings) if nextitem is not None else None
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
    hand_notices_back(config)
    coordinator = config.stash.get(COORDINATOR_KEY, None)
    if coordinator is None and not is_worker(config) and _run_has_records(config):
        coordinator = coordinator_for(config)
    if coordinator is None:
        return
    try:
        problems = coordinator.finish()
    except KeyboardInterrupt:
        # A second Ctrl-C (or SIGTERM) during the restore: leave now, and say
        # what is left and what repairs it, in one line, not a traceback.
        sys.stderr.write(f"kvmsnap: interrupted while restoring the guests; left unrestored: "
                         f"{coordinator.left_behind()}. Run `pytest --kvm-cleanup` (with this run's --kvm-uri) "
                         "to restore them now; the next run that uses them repairs them too.\n")
        session.exitstatus = pytest.ExitCode.INTERRUPTED
        return
    session.config.stash[PROBLEMS_KEY] = problems
    if problems and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    coordinator = config.stash.get(COORDINATOR_KEY, None)
    if coordinator is None or is_worker(config):
        return
    tr = terminalreporter
    tr.section("kvmsnap")
    for event in [*coordinator.run_events, *notices_for_summary(config)]:
        tr.write_line(event)
    for record in coordinator.finishing.finished:
        for event in record.events:
            tr.write_line(event)
        tr.write_line(summary(record, pool=len(coordinator.settings.pool) > 1))
        for snapshot, how in sorted(record.revert_methods.items()):
            tr.write_line(f"  revert method for {snapshot}: {how}")
    for problem in config.stash.get(PROBLEMS_KEY, []):
        tr.write_line(f"kvmsnap: could not restore {problem}", red=True, bold=True)
    all_times = [t for record in coordinator.finishing.finished for t in record.revert_times()]
    if all_times:
        tr.write_line(f"kvmsnap: {len(all_times)} revert(s), median {statistics.median(all_times):.3f} s")
    write_summary(tr, config.stash[RUN_FIGURES_KEY], coordinator.settings.uri, coordinator.hypervisor.kind.advice,
                  config.get_verbosity() > 0)


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
