"""What a clone costs, local and over libvirt's remote protocol, and N clones started at once.

Usage (as root, after scripts/setup-host.sh and with the project installed):

    python benchmarks/clone_benchmark.py [--clones 1 2 4] [--rounds 3]
        [--uri qemu:///system] [--uri qemu+tcp://127.0.0.1/system]
        [--uri "$(bash scripts/setup-ssh-hypervisor.sh),/home/kvmsnap-remote/images"]

Per URI (``URI,DIR`` puts that hypervisor's guest files in DIR) it defines the
busybox test guest ``kvmsnap-bench``, takes a baseline snapshot and times what
``--kvm-clones`` does (clones.py), through the same functions the plugin calls:

- the run's copy of the guest's disks (paused while its bytes are relayed
  from one libvirt stream to another);
- one clone's disk copy alone (MiB: the run's image, baseline memory inside);
- N clones started at the same time, each in a thread with its own
  connection as each xdist worker has: copy, start paused, revert to the
  baseline.  The wall time of all N beside one shows what starting a run's
  clones together saves; the cost per clone is that wall time over N.

For reference it also times the ``cp --reflink=auto`` the plugin used before
(which could only run where the images are; ext4 here cannot reflink).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import libvirt

from pytest_kvmsnap.libvirt import storage
from pytest_kvmsnap.libvirt.clones import LibvirtClones
from pytest_kvmsnap.libvirt.machine import LibvirtMachine
from pytest_kvmsnap.libvirt.snapshots import LibvirtSnapshot
from pytest_kvmsnap.ownership import Owner, clone_name, owner_description
from pytest_kvmsnap.processes import process_token
from pytest_kvmsnap.records import CloneSource
from pytest_kvmsnap.testing import Console, build_image, define_guest, remove_guest

GUEST = "kvmsnap-bench"


def owner() -> Owner:
    return Owner(uuid.uuid4().hex[:8], os.getpid(), os.uname().nodename, time.time(),
                         process_token(os.getpid()))


def start_clones(uri: str, source: CloneSource, count: int, run: Owner) -> float:
    """Start ``count`` clones at once, one thread and connection each; the wall time."""
    names = [clone_name(GUEST, run.run_id, slot) for slot in range(count)]
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            LibvirtClones(libvirt.open(uri)).make_clone(source, GUEST, name, run)
        except BaseException as exc:  # reported below, after every thread ended
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(name,)) for name in names]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    conn = libvirt.open(uri)
    for name in names:
        LibvirtClones(conn).destroy(name)
    if errors:
        raise errors[0]
    return wall


def measure(uri: str, counts: list[int], rounds: int) -> dict[str, float]:
    conn = libvirt.open(uri)
    dom = conn.lookupByName(GUEST)
    run = owner()
    snap = dom.snapshotCreateXML(f"<domainsnapshot><name>bench-{run.run_id}</name>"
                                 f"<description>{owner_description(run)}</description></domainsnapshot>", 0)
    try:
        begin = time.perf_counter()
        source = LibvirtClones(conn).make_source(LibvirtMachine(dom), LibvirtSnapshot(snap), run)
        row = {"run's copy": time.perf_counter() - begin}
    finally:
        snap.delete(0)
    try:
        row["copy"], row["MiB"], row["cp"] = copy_seconds(conn, source, rounds)
        for count in counts:
            row[f"{count} at once"] = statistics.median(start_clones(uri, source, count, run) for _ in range(rounds))
    finally:
        LibvirtClones(conn).remove_source(source)
    return row


def copy_seconds(conn: libvirt.virConnect, source: CloneSource, rounds: int) -> tuple[float, float, float]:
    """One clone's disk copy alone (the run's image, baseline and its memory inside), its
    MiB, and for reference the ``cp --reflink=auto`` of the same file the plugin made before
    (here the files are on this host whatever the URI)."""
    pool = conn.storagePoolLookupByName(source.pool)
    volume = pool.storageVolLookupByName(next(iter(source.disks.values())))
    times, cp_times = [], []
    for _ in range(rounds):
        begin = time.perf_counter()
        storage.copy(volume, pool, "scratch.qcow2").delete(0)
        times.append(time.perf_counter() - begin)
        with tempfile.TemporaryDirectory() as directory:
            begin = time.perf_counter()
            subprocess.run(["cp", "--reflink=auto", "--sparse=always", volume.path(), directory], check=True)
            cp_times.append(time.perf_counter() - begin)
    return statistics.median(times), volume.info()[2] / 2**20, statistics.median(cp_times)


def on_guest(uri: str, directory: str, counts: list[int], rounds: int) -> dict[str, float]:
    """Define the bench guest at ``uri`` (files in ``directory``), measure, remove it."""
    conn = libvirt.open(uri)
    image = build_image(Path(directory) if directory else None)
    define_guest(conn, GUEST, image)
    try:
        Console(str(image.console_for(GUEST))).wait_ready()
        return measure(uri, counts, rounds)
    finally:
        remove_guest(conn, GUEST, image)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clones", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uri", action="append", default=[], help="URI or URI,GUEST_DIR (repeatable)")
    args = parser.parse_args()
    targets = [uri.partition(",")[::2] for uri in (args.uri or ["qemu:///system", "qemu+tcp://127.0.0.1/system"])]
    libvirt.registerErrorHandler(lambda *_: None, None)
    rows = {uri: on_guest(uri, directory, args.clones, args.rounds) for uri, directory in targets}
    print(f"median of {args.rounds} round(s); seconds")
    columns = ["MiB", "run's copy", "copy", "cp", *(f"{count} at once" for count in args.clones)]
    most = max(args.clones)
    print(f"  {'URI':40}" + "".join(f"{c:>12}" for c in columns) + f"{'per clone':>11}")
    for uri, row in rows.items():
        print(f"  {uri[:40]:40}" + "".join(f"{row[c]:12.2f}" for c in columns)
              + f"{row[f'{most} at once'] / most:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
