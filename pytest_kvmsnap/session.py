"""The pytest session's wiring: per-run objects in ``config.stash`` (pytest's public
API for plugin state), what xdist's controller tells its workers and which of its
distributions a unit allows, SIGTERM, and how the coordinator's events reach the
terminal and the plugin's hooks."""

from __future__ import annotations

import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from pytest_kvmsnap.config import Settings, Spec
from pytest_kvmsnap.coordinator import Coordinator
from pytest_kvmsnap.engine import EngineKind
from pytest_kvmsnap.events import BaselineTaken, Event, Notice, Ready, Reverted, RevertStarting, Waiting
from pytest_kvmsnap.guest import Guest
from pytest_kvmsnap.locking import default_lock_dir, prepare_lock_dir

SETTINGS_KEY = pytest.StashKey[Settings]()
RUN_ID_KEY = pytest.StashKey[str]()
COORDINATOR_KEY = pytest.StashKey[Coordinator]()
PROBLEMS_KEY = pytest.StashKey[list[str]]()
# The spec a test's setup began protecting its guests for: its teardown ends those.
PREPARED_KEY = pytest.StashKey[Spec]()
PROTECTED_KEY = pytest.StashKey[bool]()  # setup finished protecting them
EVIDENCE_KEY = pytest.StashKey[bool]()  # a failed report of the test has its guests' evidence
# The marked test being set up, run or torn down now (its fixtures build layers; kvm_guest_factory).
CURRENT_KEY = pytest.StashKey["pytest.Item | None"]()
# guests that tests reach with kvm_ssh: each gets a resident settle process (resident.py)
SSH_GUESTS_KEY = pytest.StashKey[frozenset[str]]()
# What xdist's controller tells its workers (through node.workerinput).
WORKER_RUN = "kvmsnap_run"
WORKER_OWNER = "kvmsnap_owner_pid"
WORKER_DIST = "kvmsnap_dist"
# What a worker hands back (node.workeroutput): its notices, which nobody sees on its stderr.
WORKER_NOTICES = "kvmsnap_notices"
NOTICES_KEY = pytest.StashKey[list[str]]()  # a worker's notices; on the controller, every worker's
PROGRESS_EVERY = 10.0  # seconds between "still waiting" lines


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def worker_dist(config: pytest.Config) -> str | None:
    """xdist's --dist on a worker (the controller passes it: xdist resets the worker's own), else None."""
    workerinput = getattr(config, "workerinput", None)
    return None if workerinput is None else str(workerinput.get(WORKER_DIST, "no"))


def hand_notices_back(config: pytest.Config) -> None:
    """On a worker at its session's end: its notices go to the controller with its results."""
    output = getattr(config, "workeroutput", None)
    if output is not None:
        output[WORKER_NOTICES] = config.stash.get(NOTICES_KEY, [])


def take_notices(config: pytest.Config, node: object) -> None:
    """On the controller, as a worker ends: keep its notices for the summary."""
    worker = getattr(getattr(node, "gateway", None), "id", "worker")
    notices = getattr(node, "workeroutput", {}).get(WORKER_NOTICES, [])
    config.stash.setdefault(NOTICES_KEY, []).extend(f"[{worker}] {text}" for text in notices)


def notices_for_summary(config: pytest.Config) -> list[str]:
    """The workers' notices, each once (with how often, when more than once)."""
    notices: list[str] = config.stash.get(NOTICES_KEY, [])
    counts = Counter(notices)  # in first-seen order
    return [text if n == 1 else f"{text} ({n} times)" for text, n in counts.items()]


def run_id(config: pytest.Config) -> str:
    """One id for the whole run: the controller's on xdist workers, else a new one."""
    workerinput = getattr(config, "workerinput", {})
    if WORKER_RUN in workerinput:
        return str(workerinput[WORKER_RUN])
    if RUN_ID_KEY not in config.stash:
        config.stash[RUN_ID_KEY] = uuid.uuid4().hex[:12]
    return config.stash[RUN_ID_KEY]


def lock_dir_path(settings: Settings) -> Path:
    return Path(settings.lock_dir) if settings.lock_dir else default_lock_dir()


def lock_dir(settings: Settings) -> Path:
    """The lock directory, created and checked (an explicit one may be shared)."""
    return prepare_lock_dir(lock_dir_path(settings), shared=bool(settings.lock_dir))


def clone_slot(config: pytest.Config, settings: Settings) -> int | None:
    """Clone mode: which clone this process uses (xdist worker gwN -> N mod clones)."""
    workerinput = getattr(config, "workerinput", {})
    count = settings.clone_count(int(workerinput.get("workercount", 1)))
    if count == 0:
        return None
    return int(str(workerinput.get("workerid", "gw0")).removeprefix("gw") or 0) % count


def coordinator_for(config: pytest.Config) -> Coordinator:
    """The run's coordinator, created on first need so unused runs touch no hypervisor."""
    if COORDINATOR_KEY not in config.stash:
        settings = config.stash[SETTINGS_KEY]
        workerinput = getattr(config, "workerinput", {})
        config.stash[COORDINATOR_KEY] = Coordinator(
            settings, run_id(config), lock_dir(settings), owner_pid=workerinput.get(WORKER_OWNER),
            finisher=not is_worker(config), report=SessionReporter(config),
            clone_slot=clone_slot(config, settings), ready_hook=_ready_hook(config),
            worker=str(workerinput.get("workerid", "")), engine_kind=engine_kind(config),
            ssh_guests=config.stash.get(SSH_GUESTS_KEY, frozenset()))
        _terminate_like_ctrl_c()
    return config.stash[COORDINATOR_KEY]


def ssh_guests(specs: list[tuple[Spec, list[str]]], settings: Settings) -> frozenset[str]:
    """The guests a test reaches with ``kvm_ssh`` (its first guest), from each marked test's spec
    and fixture names: the run starts a resident settle process in each (resident.py) where it
    sets the clock or reseeds.  Not for a test based on a snapshot of the user's (``snapshot=``
    never holds one), nor in clone mode (a clone starts from the original's state)."""
    if settings.resident == "off" or settings.sync_clock == settings.reseed == "off" or settings.clones != "0":
        return frozenset()
    return frozenset(spec.domains[0] for spec, fixtures in specs if "kvm_ssh" in fixtures and not spec.snapshot)


def engine_kind(config: pytest.Config) -> EngineKind | None:
    """The engine a plugin provides (pytest_kvmsnap_engine); None: libvirt."""
    return cast("EngineKind | None", config.pluginmanager.hook.pytest_kvmsnap_engine(config=config))


def _terminate_like_ctrl_c() -> None:
    """SIGTERM (CI cancelling a job, ``kill``) ends the session like Ctrl-C does.

    pytest then runs its normal session end, and the guests are restored and the
    run's snapshot deleted.  Installed only by runs that use a guest, and only
    where nothing else claimed SIGTERM.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _ready_hook(config: pytest.Config) -> Callable[[Guest, float], None] | None:
    """The users' pytest_kvmsnap_ready, for --kvm-wait=hook; None when nobody implements it."""
    if not config.pluginmanager.hook.pytest_kvmsnap_ready.get_hookimpls():
        return None
    return lambda guest, timeout: config.hook.pytest_kvmsnap_ready(config=config, guest=guest, timeout=timeout)


class SessionReporter:
    """The coordinator's events, for pytest: lines on the terminal, and the plugin's hooks."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._last_wait = 0.0

    def __call__(self, event: Event) -> None:
        hook = self.config.hook
        if isinstance(event, BaselineTaken):
            hook.pytest_kvmsnap_baseline(config=self.config, domain=event.domain, snapshot=event.snapshot,
                                         seconds=event.seconds)
        elif isinstance(event, Reverted):
            hook.pytest_kvmsnap_reverted(config=self.config, domain=event.domain, snapshot=event.snapshot,
                                         seconds=event.seconds, method=event.method, reason=event.reason)
        elif isinstance(event, RevertStarting):
            hook.pytest_kvmsnap_before_revert(config=self.config, domain=event.domain, snapshot=event.snapshot,
                                              reason=event.reason)
        elif isinstance(event, Ready):
            hook.pytest_kvmsnap_after_revert(config=self.config, domain=event.domain, generation=event.generation,
                                             seconds=event.seconds, steps=event.steps)
        elif isinstance(event, Waiting):
            now = time.monotonic()  # a long wait says so every few seconds, not every poll
            if now - self._last_wait >= PROGRESS_EVERY:
                self._last_wait = now
                self._write(event.text)
        else:
            if isinstance(event, Notice) and is_worker(self.config):  # xdist shows no worker's stderr
                self.config.stash.setdefault(NOTICES_KEY, []).append(event.text)
            self._write(event.text)

    def _write(self, text: str) -> None:
        config = self.config
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capman = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or is_worker(config):
            print(text, file=sys.stderr, flush=True)
            return
        # Waits happen during test setup, while pytest captures output: step
        # out of the capture like pytest-timeout does, so the line is seen now.
        if capman is not None:
            capman.suspend_global_capture(in_=True)
        try:
            reporter.write_line(text, yellow=True)
        finally:
            if capman is not None:
                capman.resume_global_capture()


# xdist modes that keep every test of one module (and class) on one worker.
_KEEPS_MODULES = ("loadscope", "loadfile")


def distribution_refusal(item: pytest.Item, spec: Spec, dist: str | None) -> str | None:
    """Why a test of a unit larger than itself may not run under xdist's ``dist``.

    ``dist`` is None outside xdist's workers: one process spreads nothing.
    """
    if dist is None or spec.scope == "function":
        return None
    if dist == "loadgroup":
        # xdist marks a grouped test's node id with '@'.  With pytest 9.2 and
        # pytest-xdist 3.8 it silently does not (pytest-xdist issue 1386), nor
        # for a marker added after collection; a split unit would see other
        # units' changes.
        if "@" in item.nodeid:
            return None
        return (f"{item.nodeid} uses scope={spec.scope!r}, but this pytest-xdist's --dist loadgroup "
                "does not group tests with this pytest (pytest-xdist issue 1386), or the marker was added "
                "after xdist grouped the tests. Use --dist loadscope or loadfile for class and module "
                "scopes, or run without xdist.")
    if dist in _KEEPS_MODULES and spec.scope in ("class", "module"):
        return None
    return (f"{item.nodeid} uses scope={spec.scope!r}, whose tests must run on one xdist "
            f"worker, but --dist {dist} spreads them. Use --dist loadscope or loadfile for class "
            "and module scopes, or --dist loadgroup (pytest-kvmsnap groups each unit).")
