"""How many libvirt calls the plugin makes per test, and how many of them reach the daemon.

Usage (as root, after scripts/setup-host.sh and with the project installed):

    python benchmarks/round_trips.py [--uri qemu:///system] [--tests 10 30]

It starts the busybox test guest ``kvmsnap-rt``, runs pytest in this process
under cProfile on suites of N marked tests (each writes to the guest's disk, so
every test is followed by a revert), and counts the calls into libvirt's C module.
Per test is the difference between the two suites over the difference in N:
what the session costs once (baseline, finish) cancels out.  Calls that libvirt
answers in the client (a name, a UUID, the connection of a handle) are counted
apart from those that are a round trip to libvirtd, which are what a remote
hypervisor makes slower.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from collections import Counter
from pathlib import Path

import libvirt
import pytest

from pytest_kvmsnap.testing import build_image, define_guest, remove_guest

GUEST = "kvmsnap-rt"
# Answered by the client library, no message to libvirtd: from the handle it holds (a name, a
# UUID, the id it was looked up with), the connection's socket state (IsAlive), or a value the
# remote driver caches after its first call (GetType).
LOCAL = {"virDomainGetName", "virDomainGetUUID", "virDomainGetUUIDString", "virDomainGetID",
         "virDomainSnapshotGetName", "virDomainSnapshotGetDomain", "virDomainGetConnect", "virConnectRef",
         "virConnectIsAlive", "virConnectGetType", "virGetLastError", "virResetLastError",
         "virRegisterErrorHandler", "virConnectClose", "virDomainFree", "virDomainSnapshotFree",
         "virConnectOpen", "virConnectOpenAuth"}
SUITE = """
import pytest

@pytest.mark.kvm_snapshot({guest!r})
@pytest.mark.parametrize("i", range({tests}))
def test_t(i, kvm_guest):
    kvm_guest.is_dirty  # the guest is used; the revert after it is what is counted
"""


def libvirt_calls(uri: str, tests: int) -> Counter[str]:
    """The calls into libvirtmod (and libvirtmod_qemu) of one pytest run of ``tests`` tests."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"test_rt_{tests}.py"  # one module name per run of this process
        path.write_text(SUITE.format(guest=GUEST, tests=tests))
        profile = cProfile.Profile()
        profile.enable()
        code = pytest.main([str(path), f"--kvm-uri={uri}", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"])
        profile.disable()
        if code != 0:
            sys.exit(f"the suite failed ({code})")
    counts: Counter[str] = Counter()
    for (_file, _line, function), (calls, *_rest) in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        if "libvirtmod" in function:
            counts[function.split(".")[-1].rstrip(">")] += calls
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="qemu:///system")
    parser.add_argument("--tests", type=int, nargs=2, default=[10, 30])
    args = parser.parse_args()
    conn = libvirt.open(args.uri)
    image = build_image()
    define_guest(conn, GUEST, image)
    try:
        few, many = args.tests
        small, large = libvirt_calls(args.uri, few), libvirt_calls(args.uri, many)
    finally:
        remove_guest(conn, GUEST, image)
        conn.close()
    per_test = {name: (large[name] - small[name]) / (many - few) for name in large}
    per_test = {name: count for name, count in per_test.items() if count}
    daemon = {name: count for name, count in per_test.items() if name not in LOCAL}
    for name, count in sorted(per_test.items(), key=lambda item: -item[1]):
        print(f"{count:6.2f}  {name}{'' if name in daemon else '  (client only)'}")
    print(f"per test: {sum(per_test.values()):.1f} libvirt calls, {sum(daemon.values()):.1f} round trips to libvirtd")


if __name__ == "__main__":
    main()
