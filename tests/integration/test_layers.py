"""Layered baselines on a real guest: every test starts from what its wider fixtures built.

A session fixture installs "the app" (on disk and in RAM), a module fixture
seeds data on top; every test checks both, then dirties the guest.  The rules
of the README's "Fixtures build the guest" section, each on a real QEMU guest:
one checkpoint per layer, reverts to the top layer, a module's seed gone in the
next module, every revert mode, xdist (each process its own layers), clones,
``--kvm-cleanup`` and the next run after a kill inside a checkpoint or a layer
teardown, and the guest as found after every run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.conftest import INNER_CONFTEST, RealGuest, run_inner
from tests.integration.test_kill_points import STRETCH
from tests.integration.test_semantics import CLEAN, assert_as_found

FIXTURES = """
import os, signal, threading
import pytest

def kill_soon(point):
    # A kill point: the plugin's next step (the checkpoint after the session fixture,
    # the revert down a layer after the module fixture's teardown) starts at once.
    if os.environ.get("KVMSNAP_LAYER_KILL") == point:
        threading.Timer(float(os.environ["KVMSNAP_LAYER_DELAY"]), os.kill, (os.getpid(), signal.SIGKILL)).start()

@pytest.fixture(scope="session")
def app(kvm_guest_factory):
    guest = kvm_guest_factory.get()
    sh = console(guest.name)
    sh.check("echo installed > /data/app; echo running > /tmp/app")
    if os.environ.get("KVMSNAP_LAYER_KILL"):
        sh.check("STRETCH", timeout=120)  # RAM that makes savevm and loadvm last long enough to be hit
    kill_soon("checkpoint")
    yield guest.name

@pytest.fixture(scope="module")
def seed(app, kvm_guest_factory):
    console(kvm_guest_factory.get().name).check("echo seeded > /data/seed")
    yield
    kill_soon("layer teardown")
"""

STORY = """
import pytest

@pytest.mark.kvm_snapshot("{name}"{marker})
@pytest.mark.parametrize("i", range(3))
def test_t(i, app, seed, sh):
    assert sh.check("cat /data/app /tmp/app") == "installed\\nrunning", "the session fixture's app is gone"
    assert sh.check("cat /data/seed") == "seeded", "the module fixture's seed is gone"
    assert sh.run("{clean}").status == 0, "an earlier test's change leaked"
    sh.check(f"echo {{i}} > /data/marker; echo {{i}} > /tmp/marker")
"""

SECOND_MODULE = """
import pytest

@pytest.mark.kvm_snapshot("{name}"{marker})
def test_other_module(app, sh):
    assert sh.check("cat /data/app /tmp/app") == "installed\\nrunning"
    assert sh.run("ls /data/seed").status != 0, "the first module's seed leaked"
    assert sh.run("{clean}").status == 0
"""


def write_story(inner: pytest.Pytester, guest: RealGuest, marker: str = "") -> None:
    inner.makeconftest(INNER_CONFTEST + FIXTURES.replace("STRETCH", STRETCH))
    inner.makepyfile(test_a=STORY.format(name=guest.name, marker=marker, clean=CLEAN),
                     test_b=SECOND_MODULE.format(name=guest.name, marker=marker, clean=CLEAN))


def as_found(guest: RealGuest) -> None:
    assert_as_found(guest)
    assert guest.console.run("ls /data/app /data/seed /tmp/app").status != 0, "a fixture's work was left"


@pytest.mark.parametrize("revert", ["after", "before", "both"])
def test_every_test_starts_from_what_its_wider_fixtures_built(inner: pytest.Pytester, guest_a: RealGuest,
                                                              revert: str) -> None:
    write_story(inner, guest_a, f', revert="{revert}"')
    result = run_inner(inner, "-p", "no:randomly")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([f"*{guest_a.name}: checkpoint kvmsnap-*-main-L1 after session fixture 'app'*",
                                 f"*{guest_a.name}: checkpoint kvmsnap-*-main-L2 after module fixture 'seed'*"])
    assert result.stdout.str().count(": checkpoint kvmsnap-") == 2, "one checkpoint per layer"
    as_found(guest_a)


def test_each_xdist_worker_builds_its_own_layers(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    write_story(inner, guest_a)
    result = run_inner(inner, "-n", "2", "--dist", "loadfile")
    result.assert_outcomes(passed=4)
    # Each worker set the app up, and checkpointed it, for itself (the summary counts both).
    result.stdout.fnmatch_lines([f"{guest_a.name}: baseline kvmsnap-* 3 checkpoint(s) of wider fixtures' state*"])
    as_found(guest_a)


def test_clones_build_their_layers_on_the_clone(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    write_story(inner, guest_a)
    result = run_inner(inner, "-n", "2", "--dist", "loadfile", "--kvm-clones=auto")
    result.assert_outcomes(passed=4)
    # One clone ran the module with two layers (app, seed), the other the one with one (app); which
    # clone got which module is up to xdist, and the summary lists clones by name, so count per clone.
    counts = sorted(re.findall(rf"^{re.escape(guest_a.name)}-kvmsnap-\S+: baseline .* (\d+) checkpoint\(s\) of wider",
                               result.stdout.str(), flags=re.MULTILINE))
    assert counts == ["1", "2"], result.stdout.str()
    as_found(guest_a)


@pytest.mark.parametrize(("point", "delay"), [("checkpoint", 0.02), ("layer teardown", 0.05)])
def test_a_kill_inside_a_layer_operation_is_repaired_to_the_baseline(
        inner: pytest.Pytester, guest_a: RealGuest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        point: str, delay: float) -> None:
    """Killed inside a checkpoint's savevm, or inside the revert down to the layer below: the
    dead run's baseline and layers are on the guest; --kvm-cleanup restores the *baseline*
    (never a layer) and deletes them all."""
    locks = tmp_path / "locks"
    write_story(inner, guest_a)
    monkeypatch.setenv("KVMSNAP_LAYER_KILL", point)
    monkeypatch.setenv("KVMSNAP_LAYER_DELAY", str(delay))
    result = run_inner(inner, f"--kvm-lock-dir={locks}", "-p", "no:randomly")
    assert result.ret == -9, result.stdout.str()
    monkeypatch.delenv("KVMSNAP_LAYER_KILL")
    cleanup = run_inner(inner, f"--kvm-lock-dir={locks}", "--kvm-cleanup", f"--kvm-domain={guest_a.name}")
    assert cleanup.ret == 0
    cleanup.stdout.fnmatch_lines([f"*{guest_a.name}: restored to kvmsnap-???????????? left by dead run * and "
                                  "deleted * orphan snapshot(s)"])
    guest_a.console.check("rm -f /tmp/fill", timeout=60)
    assert not list(locks.glob("*.json")), "a run record was left"
    as_found(guest_a)


# --- guest setups kept across runs (reuse.py) -----------------------------------------

KEPT_SETUP = """
from pathlib import Path
import pytest
from pytest_kvmsnap import guest_setup

@pytest.fixture(scope="session")
@guest_setup
def app(kvm_guest_factory):
    guest = kvm_guest_factory.get()
    console(guest.name).check("echo installed > /data/app; echo running > /tmp/app")
    ran = Path(__file__).with_name("ran")
    ran.write_text((ran.read_text() if ran.exists() else "") + "x")
    return {"guest": guest.name}
"""

FROM_KEPT_SETUP = """
import pytest

@pytest.mark.kvm_snapshot("{name}", snapshot="it-base")
@pytest.mark.parametrize("i", range(2))
def test_t(i, app, sh):
    assert app == {{"guest": "{name}"}}
    assert sh.check("cat /data/app /tmp/app") == "installed\\nrunning", "the kept setup's disk or RAM is gone"
    assert sh.run("{clean}").status == 0, "an earlier test's change leaked"
    sh.check(f"echo {{i}} > /data/marker; echo {{i}} > /tmp/marker")
"""


def test_a_guest_setup_is_kept_reused_by_later_runs_and_run_again_when_its_source_changes(
        inner: pytest.Pytester, guest_a: RealGuest) -> None:
    dom = guest_a.domain()
    dom.snapshotCreateXML("<domainsnapshot><name>it-base</name></domainsnapshot>", 0)
    inner.makeconftest(INNER_CONFTEST + KEPT_SETUP)
    tests = FROM_KEPT_SETUP.format(name=guest_a.name, clean=CLEAN)
    inner.makepyfile(test_a=tests, test_b=tests)
    ran = inner.path / "ran"
    try:
        first = run_inner(inner, "-p", "no:randomly")
        first.assert_outcomes(passed=4)
        [kept] = [name for name in guest_a.snapshots() if name.startswith("kvmsnap-setup-app-")]
        first.stdout.fnmatch_lines([f"*{guest_a.name}: kept {kept} after session fixture 'app' for later runs*"])
        assert ran.read_text() == "x"
        assert_as_found(guest_a, ["it-base", kept])

        # Later runs, xdist workers too: the kept layer, memory included, in place of the body.
        second = run_inner(inner, "-n", "2", "--dist", "loadfile")
        second.assert_outcomes(passed=4)
        second.stdout.fnmatch_lines([f"*{guest_a.name}: session fixture 'app' reused from {kept} *"])
        assert ran.read_text() == "x", "the kept setup's body ran again"
        assert_as_found(guest_a, ["it-base", kept])

        # A changed conftest is another key: the body runs, and its new layer replaces the old one.
        conftest = inner.path / "conftest.py"
        conftest.write_text(conftest.read_text() + "\n# the helpers changed\n")
        run_inner(inner).assert_outcomes(passed=4)
        assert ran.read_text() == "xx"
        [replaced] = [name for name in guest_a.snapshots() if name.startswith("kvmsnap-setup-app-")]
        assert replaced != kept
        assert_as_found(guest_a, ["it-base", replaced])

        # A base made anew under the same name is another base: run again, replaced again.
        dom.snapshotLookupByName("it-base").delete(0)
        dom.snapshotCreateXML("<domainsnapshot><name>it-base</name></domainsnapshot>", 0)
        run_inner(inner).assert_outcomes(passed=4)
        assert ran.read_text() == "xxx"
        [rebased] = [name for name in guest_a.snapshots() if name.startswith("kvmsnap-setup-app-")]
        assert rebased != replaced
        replaced = rebased

        listed = run_inner(inner, "--kvm-cleanup", "--kvm-keep-setups", f"--kvm-domain={guest_a.name}")
        listed.stdout.fnmatch_lines([f"*{guest_a.name}: kept guest setup {replaced} (fixture 'app'*); left alone"])
        removed = run_inner(inner, "--kvm-cleanup", f"--kvm-domain={guest_a.name}")
        assert removed.ret == 0
        removed.stdout.fnmatch_lines([f"*{guest_a.name}: deleted kept guest setup {replaced} (fixture 'app'*"])
        assert_as_found(guest_a, ["it-base"])
    finally:
        for name in guest_a.snapshots():
            dom.snapshotLookupByName(name).delete(0)


def test_a_kill_while_a_guest_setup_is_kept_is_repaired_and_the_next_run_still_correct(
        inner: pytest.Pytester, guest_a: RealGuest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed inside the savevm that keeps the setup: --kvm-cleanup restores the run's baseline and
    deletes its own snapshots; the kept setup is left alone if it was completed (the fixture had
    finished), and the next run either reuses it or runs the fixture again -- never a half."""
    locks = tmp_path / "locks"
    dom = guest_a.domain()
    dom.snapshotCreateXML("<domainsnapshot><name>it-base</name></domainsnapshot>", 0)
    killing = KEPT_SETUP.replace('    return {"guest": guest.name}', '''    if os.environ.get("KVMSNAP_LAYER_KILL"):
        console(guest.name).check("STRETCH", timeout=120)
        threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGKILL)).start()
    return {"guest": guest.name}''').replace("STRETCH", STRETCH)
    inner.makeconftest(INNER_CONFTEST + "import os, signal, threading\n" + killing)
    inner.makepyfile(test_a=FROM_KEPT_SETUP.format(name=guest_a.name, clean=CLEAN))
    try:
        monkeypatch.setenv("KVMSNAP_LAYER_KILL", "keep")
        killed = run_inner(inner, f"--kvm-lock-dir={locks}", "-p", "no:randomly")
        assert killed.ret == -9, killed.stdout.str()
        monkeypatch.delenv("KVMSNAP_LAYER_KILL")
        cleanup = run_inner(inner, f"--kvm-lock-dir={locks}", "--kvm-cleanup", "--kvm-keep-setups",
                            f"--kvm-domain={guest_a.name}")
        assert cleanup.ret == 0
        cleanup.stdout.fnmatch_lines([f"*{guest_a.name}: restored to kvmsnap-???????????? left by dead run *"])
        guest_a.console.check("rm -f /tmp/fill", timeout=60)
        left = [name for name in guest_a.snapshots() if name != "it-base"]
        assert all(name.startswith("kvmsnap-setup-app-") for name in left), left
        after = run_inner(inner, f"--kvm-lock-dir={locks}", "-p", "no:randomly")
        after.assert_outcomes(passed=2)
        reused = "reused from" in after.stdout.str()
        assert reused == bool(left), after.stdout.str()
        [kept] = [name for name in guest_a.snapshots() if name != "it-base"]
        assert_as_found(guest_a, ["it-base", kept])
    finally:
        for name in guest_a.snapshots():
            dom.snapshotLookupByName(name).delete(0)


def test_a_guest_setup_without_a_fixed_base_runs_every_time_and_the_run_says_why(
        inner: pytest.Pytester, guest_a: RealGuest) -> None:
    inner.makeconftest(INNER_CONFTEST + KEPT_SETUP)
    inner.makepyfile(test_a=FROM_KEPT_SETUP.format(name=guest_a.name, clean=CLEAN).replace(', snapshot="it-base"', ""))
    for runs in ("x", "xx"):
        result = run_inner(inner)
        result.assert_outcomes(passed=2)
        result.stdout.fnmatch_lines(["*guest setup 'app' is not kept for later runs: its guests have no fixed base*"])
        assert (inner.path / "ran").read_text() == runs
        assert_as_found(guest_a)
