"""A failed test's witness: where each guest's console stood when the test began, what
the guests showed when it failed, and the state kept for the user (``--kvm-keep-failed``).

The coordinator says when (a test starts, a report fails, a failed test ends);
this module does it, with ``postmortem.py``'s plain helpers.  No pytest here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pytest_kvmsnap import postmortem
from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.events import Notice, Reporter
from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.figures import GuestFigures
from pytest_kvmsnap.guest import GuestState
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.ownership import kept_clone_name


class Witness:
    def __init__(self, settings: Settings, hypervisor: Hypervisor, run_id: str, report: Reporter) -> None:
        self.hypervisor = hypervisor
        self.settings = settings
        self.report = report
        self.run_id = run_id
        self._local_uris: dict[str, bool] = {}

    def mark(self, state: GuestState, name: str) -> None:
        """A protected test starts: note where the guest's console log ends now."""
        if not self.settings.console_lines and self.settings.artifacts is None:
            return
        with self.hypervisor.errors(state.uri, f"finding guest {name!r}'s console log"):
            machine = self.hypervisor.machine(state.name, state.uri)
            state.console = postmortem.console_mark(machine, self._local(state.uri))

    def _local(self, uri: str) -> bool:
        """Is the hypervisor this host (asked once per URI: a round trip)?"""
        if uri not in self._local_uris:
            self._local_uris[uri] = self.hypervisor.engine(uri).is_this_host()
        return self._local_uris[uri]

    def evidence(self, state: GuestState, nodeid: str,
                 artifacts: Path | None) -> tuple[postmortem.ConsoleTail, list[Path]]:
        """The guest's console during the test, and in ``artifacts`` the whole console and,
        for a guest with a screen, a screenshot."""
        assert state.console is not None, "a marked guest has a console mark"
        tail = postmortem.console_since(state.name, state.console, self.settings.console_lines)
        files = []
        if artifacts is not None:
            stem = postmortem.file_stem(nodeid, state.name)
            console = postmortem.save_console(tail, state.console, artifacts, stem)
            files.extend([console] if console else [])
            files.extend(self._screenshot(state, artifacts, stem))
        return tail, files

    def _screenshot(self, state: GuestState, directory: Path, stem: str) -> list[Path]:
        try:
            machine = self.hypervisor.machine(state.name, state.uri)
            if not machine.is_running() or not machine.has_screen():
                return []
            return [postmortem.save_screenshot(machine, directory, stem)]
        except (KvmSnapError, OSError, ValueError, self.hypervisor.kind.refusal) as exc:
            self.report(Notice(f"kvmsnap: {state.name}: no screenshot: {exc}"))
            return []

    def keep(self, state: GuestState, name: str, nodeid: str, figures: GuestFigures) -> None:
        """Save the failed test's guest state for the user, before anything reverts it."""
        record = state.record
        assert record is not None, "a held guest's state is kept"
        try:
            with self.hypervisor.errors(state.uri, f"saving {name!r}'s state"):
                machine = self.hypervisor.machine(state.name, state.uri)
                kept = postmortem.keep(machine, state.name, nodeid, self.run_id, self.settings.keep_failed_max)
                if state.clone_of and kept.snapshot:
                    # The run ends by removing its clones: this one is kept instead (finishing.py).
                    record.kept.append(kept.snapshot)
                    state.lock.write(record)
                    kept = dataclasses.replace(kept, guest=kept_clone_name(state.name),
                                               pool=state.name)
        except KvmSnapError as exc:
            kept = postmortem.Kept(state.name, nodeid, None, str(exc))
        if kept.snapshot is None:
            figures.not_kept = kept.why_not or ""
            self.report(Notice(f"kvmsnap: {name}: its state after {nodeid} failed was not kept: {kept.why_not}"))
            return
        figures.kept_snapshot, figures.kept_guest, figures.kept_pool = kept.snapshot, kept.guest, kept.pool
        figures.kept_uri = state.uri
        look, delete = kept.commands(self.hypervisor.kind.advice, state.uri)
        self.report(Notice(f"kvmsnap: {name}: its state after {nodeid} failed is kept as snapshot "
                           f"{kept.snapshot} of {kept.guest}; after the run, look: {look}; delete: {delete}"))
