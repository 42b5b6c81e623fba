"""What pytest's reports carry from the plugin: a failed test's evidence, each test's figures,
and the run's summary of them.

- A failed report gets its guests' console during the test as a section (like
  captured output), a kernel panic called out in its first line, and the
  evidence files' paths (``--kvm-artifacts``) as ``kvmsnap_artifact`` properties.
- Every test that used a guest gets ``kvmsnap_*`` properties (``figures.py``),
  which JUnit XML writes and xdist carries to the controller with the reports.
- The controller reads them back from the teardown reports for the summary:
  kept snapshots, evidence files, and with ``-v`` the slowest reverts and waits.
"""

from __future__ import annotations

import dataclasses
import heapq
from pathlib import Path

import pytest

from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.engine import Advice
from pytest_kvmsnap.figures import GuestFigures, Slow, from_properties, slow_entries
from pytest_kvmsnap.postmortem import ConsoleTail, Kept

ARTIFACT = "kvmsnap_artifact"
SLOWEST = 10  # lines of the slowest list, as --durations=10


@dataclasses.dataclass(eq=False)  # a plugin object: pluggy keeps them in sets
class RunFigures:
    """Read from every test's teardown report, on whichever process reports them; what the
    summary needs only, so a long run costs no memory per passing test here."""

    slowest: list[Slow] = dataclasses.field(default_factory=list)  # a min-heap of the SLOWEST slowest
    kept: list[tuple[str, GuestFigures]] = dataclasses.field(default_factory=list)  # kept, or not kept
    artifacts: list[str] = dataclasses.field(default_factory=list)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        found = from_properties(report.user_properties)
        for entry in slow_entries(report.nodeid, found):
            (heapq.heappush if len(self.slowest) < SLOWEST else heapq.heappushpop)(self.slowest, entry)
        self.kept.extend((report.nodeid, f) for f in found if f.kept_snapshot or f.not_kept)
        self.artifacts.extend(str(value) for name, value in report.user_properties if name == ARTIFACT)


RUN_FIGURES_KEY = pytest.StashKey[RunFigures]()


def with_artifacts_dir(settings: Settings, config: pytest.Config) -> Settings:
    """No --kvm-artifacts: beside the JUnit XML file when there is one (CI keeps that directory)."""
    if settings.artifacts is not None:
        return settings
    junit = config.getoption("xmlpath", None)
    if not junit:
        return settings
    return dataclasses.replace(settings, artifacts=str(Path(junit).resolve().parent / "kvmsnap-artifacts"))


def attach_evidence(item: pytest.Item, report: pytest.TestReport, evidence: list[tuple[ConsoleTail, list[Path]]],
                    show_lines: bool) -> None:
    for tail, files in evidence:
        if tail.trouble:
            _call_out(report, f"kvmsnap: guest {tail.guest!r} kernel trouble: {tail.trouble}")
        if show_lines:
            title = f"kvmsnap: {tail.guest} console during the test"
            report.sections.append((title + (" (KERNEL TROUBLE)" if tail.trouble else ""), tail.text()))
        item.user_properties.extend((ARTIFACT, str(path)) for path in files)


def _call_out(report: pytest.TestReport, line: str) -> None:
    """Put ``line`` first in the failure's message: the ``-r`` summary line and JUnit's
    ``message`` read it from the crash entry of the report's representation."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None and hasattr(crash, "message"):
        crash.message = f"{line} | {crash.message}"
    elif isinstance(report.longrepr, str):
        report.longrepr = f"{line}\n{report.longrepr}"


def write_summary(tr: pytest.TerminalReporter, run: RunFigures, uri: str, advice: Advice, verbose: bool) -> None:
    """Kept snapshots, those not kept, evidence files and (``-v``) the slowest reverts and waits."""
    for test, figures in run.kept:
        if figures.kept_snapshot:
            kept = Kept(figures.kept_guest, test, figures.kept_snapshot, pool=figures.kept_pool)
            look, delete = kept.commands(advice, figures.kept_uri or uri)
            where = "" if kept.guest == figures.guest else f" of {kept.guest}"
            tr.write_line(f"kvmsnap: kept {figures.guest}'s state after {test} failed: snapshot "
                          f"{figures.kept_snapshot}{where}")
            tr.write_line(f"  look:   {look}")
            tr.write_line(f"  delete: {delete}")
        else:
            tr.write_line(f"kvmsnap: not kept: {figures.guest}'s state after {test} failed "
                          f"({figures.not_kept})", yellow=True)
    if any(figures.kept_snapshot for _, figures in run.kept):
        tr.write_line("kvmsnap: a revert replaces the guest's current state: save it first to come back to it "
                      f"({advice.save_state('GUEST')})")
    if run.artifacts:
        directories = sorted({str(Path(path).parent) for path in run.artifacts})
        tr.write_line(f"kvmsnap: {len(run.artifacts)} evidence file(s) of failed tests in {', '.join(directories)}")
    if verbose:
        entries = sorted(run.slowest, reverse=True)
        if entries:
            tr.write_line(f"kvmsnap: slowest {len(entries)} reverts and waits")
        for entry in entries:
            tr.write_line(f"{entry.seconds:8.3f}s {entry.what:24} {entry.guest}  {entry.test}")
