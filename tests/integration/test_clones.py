"""--kvm-clones on a real guest: workers run at the same time, each on its own clone."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.integration.conftest import URI, RealGuest, run_inner
from tests.integration.test_parallel import next_run_finds_it_clean, start_run_stuck_mid_test
from tests.integration.test_semantics import CLEAN, LOCK_DIR, assert_as_found

CLONE_TESTS = """
    import json, os, time, pytest
    @pytest.mark.kvm_snapshot("{name}")
    @pytest.mark.parametrize("i", range(4))
    def test_on_a_clone(i, sh, kvm_guest):
        start = time.time()
        assert sh.check("cat /tmp/orig") == "kept", "the clone lacks the original's memory state"
        assert sh.run("{clean}").status == 0, "clone not at the baseline"
        sh.check(f"echo {{i}} > /tmp/marker; echo {{i}} > /data/marker")
        time.sleep(1.5)
        assert sh.check("cat /tmp/marker") == str(i)
        with open(f"ran-{{i}}.json", "w") as f:
            json.dump({{"guest": kvm_guest.name, "start": start, "end": time.time(),
                        "worker": os.environ.get("PYTEST_XDIST_WORKER")}}, f)
"""


def leftovers(guest: RealGuest) -> list[str]:
    """Clone domains, storage pools or copy directories of this guest that outlived the run."""
    import libvirt

    conn = libvirt.open(guest.domain().connect().getURI())
    prefix = f"{guest.name}-kvmsnap-"
    names = [f"domain {d.name()}" for d in conn.listAllDomains() if d.name().startswith(prefix)]
    names += [f"pool {p.name()}" for p in conn.listAllStoragePools() if p.name().startswith(prefix)]
    return names + [str(p) for p in guest.image.disk_for(guest.name).parent.glob(f"{prefix}*") if p.is_dir()]


def test_two_workers_run_at_once_on_their_own_clones(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    guest_a.console.check("echo kept > /tmp/orig")  # RAM only: a clone must carry memory
    lock_files = set(LOCK_DIR.glob(f"{guest_a.name}-kvmsnap-*"))
    inner.makepyfile(CLONE_TESTS.format(name=guest_a.name, clean=CLEAN))
    result = run_inner(inner, "-n", "2", "--kvm-clones=auto")
    result.assert_outcomes(passed=4)
    runs = [json.loads(p.read_text()) for p in sorted(inner.path.glob("ran-*.json"))]
    guests = {r["worker"]: r["guest"] for r in runs}
    assert len(set(guests.values())) == 2 and all(g.startswith(f"{guest_a.name}-kvmsnap-") for g in guests.values())
    by_guest = {g: [r for r in runs if r["guest"] == g] for g in set(guests.values())}
    one, two = by_guest.values()
    overlap = min(max(r["end"] for r in one), max(r["end"] for r in two)) - max(
        min(r["start"] for r in one), min(r["start"] for r in two))
    assert overlap > 1.0, f"the clones did not run at the same time: {runs}"
    assert guest_a.console.check("cat /tmp/orig") == "kept"  # the original was not reverted
    guest_a.console.check("rm /tmp/orig")
    assert leftovers(guest_a) == []
    assert set(LOCK_DIR.glob(f"{guest_a.name}-kvmsnap-*")) == lock_files, "a clone's lock file outlived the run"
    assert_as_found(guest_a)


def test_the_copies_are_made_by_libvirtd_never_read_by_pytest(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    """What lets --kvm-clones work on a remote hypervisor: the pytest process never reads
    a disk image.  Here it cannot -- in a mount namespace of its own, the guest's disk is
    /dev/null -- and the clones still start at the baseline, memory and disk."""
    import shlex
    import sys

    guest_a.console.check("echo kept > /tmp/orig")
    inner.makepyfile(CLONE_TESTS.format(name=guest_a.name, clean=CLEAN))
    disk = shlex.quote(str(guest_a.image.disk_for(guest_a.name)))
    hide = f"mount --bind /dev/null {disk} && head -c 1 {disk} | wc -c && exec \"$@\""
    result = inner.run("unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "hide",
                       sys.executable, "-m", "pytest", f"--kvm-uri={URI}", "-p", "no:cacheprovider", "-v",
                       "-n", "2", "--kvm-clones=auto", timeout=600)
    assert result.outlines[0] == "0", "the disk was not hidden from the inner run"
    result.assert_outcomes(passed=4)
    assert guest_a.console.check("cat /tmp/orig") == "kept"
    guest_a.console.check("rm /tmp/orig")
    assert leftovers(guest_a) == []
    assert_as_found(guest_a)


def test_clone_mode_refuses_a_user_snapshot(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    inner.makepyfile("def test_x(): pass")
    result = run_inner(inner, "--kvm-clones=2", "--kvm-snapshot=golden")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*kvm_clones and kvm_snapshot do not go together*"])


def test_killed_clone_run_is_cleaned_by_the_next_run(inner, guest_a: RealGuest, spawn) -> None:  # type: ignore[no-untyped-def]
    victim = start_run_stuck_mid_test(inner, spawn, guest_a, "victim", "--kvm-clones=1")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    left = leftovers(guest_a)
    kinds = sorted(item.split()[0] if item.startswith(("domain ", "pool ")) else "directory" for item in left)
    # the clone, and two pools with their directories: the run's copies and the clone's
    assert kinds == ["directory", "directory", "domain", "pool", "pool"], left
    result = next_run_finds_it_clean(inner, guest_a)
    result.stdout.fnmatch_lines([f"kvmsnap: {guest_a.name}: removed 1 clone(s) and 1 pool(s) of disk copies "
                                 "left by dead runs"])
    assert leftovers(guest_a) == []
    assert_as_found(guest_a)


def test_an_empty_ownerless_pool_a_killed_run_left_is_removed_by_the_next(  # type: ignore[no-untyped-def]
        inner, guest_a: RealGuest, spawn) -> None:
    """Killed between defining a pool of copies and writing its owner volume (the first thing
    in it), a run leaves a pool with no owner: the next run removes it, with its directory,
    once the run is known dead by its snapshot on the guest."""
    import libvirt

    victim = start_run_stuck_mid_test(inner, spawn, guest_a, "victim")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    run = next(s for s in guest_a.snapshots() if s.startswith("kvmsnap-")).removeprefix("kvmsnap-")
    conn = libvirt.open(guest_a.domain().connect().getURI())
    name = f"{guest_a.name}-kvmsnap-{run}"
    directory = guest_a.image.disk_for(guest_a.name).parent / name
    pool = conn.storagePoolDefineXML(f"<pool type='dir'><name>{name}</name><target><path>{directory}</path>"
                                     "</target></pool>", 0)
    try:
        pool.build(0)
        pool.create(0)  # what make_pool does before it writes the owner volume
        assert leftovers(guest_a) == [f"pool {name}", str(directory)]
        result = next_run_finds_it_clean(inner, guest_a)
        result.stdout.fnmatch_lines([f"kvmsnap: {guest_a.name}: removed 0 clone(s) and 1 pool(s) of disk copies "
                                     "left by dead runs"])
        assert leftovers(guest_a) == []
        assert_as_found(guest_a)
    finally:  # failed or not, no pool of this test's is left on the host
        if name in conn.listStoragePools() + conn.listDefinedStoragePools():
            from pytest_kvmsnap.libvirt import storage

            storage.remove_pool(conn.storagePoolLookupByName(name))
        conn.close()


def test_interrupted_clone_run_leaves_no_clone(inner, guest_a: RealGuest, spawn) -> None:  # type: ignore[no-untyped-def]
    run = start_run_stuck_mid_test(inner, spawn, guest_a, "run", "--kvm-clones=1")
    os.kill(run.pid, signal.SIGINT)
    assert run.wait(60) != 0
    assert "= kvmsnap =" in (inner.path / "run.out").read_text()
    assert leftovers(guest_a) == []
    assert_as_found(guest_a)


def test_a_clones_failed_state_is_kept_as_a_domain_of_its_own(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    import shlex
    import subprocess
    import xml.etree.ElementTree as ET

    from pytest_kvmsnap.testing import Console

    inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest_a.name}")
        @pytest.mark.parametrize("fail", [False, True])
        def test_on_a_clone(fail, sh):
            sh.check("echo {{}} > /tmp/marker; echo {{}} > /data/marker".format(fail, fail))
            assert not fail
    """)
    result = run_inner(inner, "-n", "2", "--kvm-clones=auto", "--kvm-keep-failed")
    result.assert_outcomes(passed=1, failed=1)
    line = next(line for line in result.stdout.lines if line.startswith("kvmsnap: kept "))
    snapshot, kept = line.split("snapshot ")[1].split(" of ")
    assert kept.startswith(f"{guest_a.name}-kept-")
    delete = next(line for line in result.stdout.lines if line.startswith("  delete:")).split("delete:")[1].strip()
    dom = guest_a.domain().connect().lookupByName(kept)
    try:
        assert not dom.isActive() and dom.isPersistent() and dom.snapshotListNames() == [snapshot]
        # What the summary says to type starts it from the failed state, memory and disk.
        dom.revertToSnapshot(dom.snapshotLookupByName(snapshot), 0)
        path = ET.fromstring(dom.XMLDesc(0)).find("devices/serial/source").get("path")  # type: ignore[union-attr]
        assert Console(str(path)).check("cat /tmp/marker /data/marker") == "True\nTrue"
        dom.destroy()
    finally:
        subprocess.run(["bash", "-c", delete], check=True, capture_output=True)  # the summary's command
    assert shlex.split(delete)[3] == "undefine" and "rm" not in shlex.split(delete), "virsh only: works remotely"
    assert leftovers(guest_a) == []
    assert_as_found(guest_a)
