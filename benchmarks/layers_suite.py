"""The suite the layers benchmark runs on the Debian guest: every test logs in over SSH.

With ``KVMSNAP_BENCH_APP=1`` (or ``kept``: the same as a ``@guest_setup``
fixture, which later runs reuse) a session fixture first sets an application up
over SSH the way a user's would (data written, many small files, a service
started), and every test checks that it is there: the plugin checkpoints it as
a layer, and each test starts from it.  Each test also checks that the previous
test's marker is gone (unless nothing reverts), writes its own, and logs out.
Timings the summary cannot give: layers_timing.py (loaded with ``-p``).
"""

import os
import time

import pytest
from bench_ssh_suite import login, run
from layers_timing import note

from pytest_kvmsnap import guest_setup

N = int(os.environ.get("KVMSNAP_BENCH_TESTS", "10"))
EXPECT_CLEAN = os.environ.get("KVMSNAP_BENCH_EXPECT_CLEAN", "1") == "1"
KEPT = os.environ.get("KVMSNAP_BENCH_APP", "") == "kept"
APP = KEPT or os.environ.get("KVMSNAP_BENCH_APP", "") == "1"
SETUP = ("mkdir -p /var/lib/app && cd /var/lib/app && dd if=/dev/urandom of=data bs=1M count=144 2>/dev/null && "
         "gzip -6 -c data > data.gz && for i in $(seq 1 6000); do echo $i > item-$i; done && "
         "systemd-run --unit=kvmsnap-app /bin/sh -c 'while true; do date > /var/lib/app/beat; sleep 1; done' && "
         "sync && sleep 1 && systemctl is-active kvmsnap-app")
FILES = 6003  # data, data.gz, the items and the service's beat


def set_up(kvm_guest_factory):
    start = time.perf_counter()
    client = login(kvm_guest_factory.get().address(22))
    try:
        assert run(client, SETUP) == "active"
    finally:
        client.close()
    note(setup=time.perf_counter() - start)


if KEPT:
    @pytest.fixture(scope="session")
    @guest_setup
    def app(kvm_guest_factory):
        set_up(kvm_guest_factory)
        return {"files": FILES}
else:
    @pytest.fixture(scope="session")
    def app(kvm_guest_factory):
        if APP:
            set_up(kvm_guest_factory)
        yield
        note(app_torn_down=time.perf_counter())


@pytest.mark.kvm_snapshot
@pytest.mark.parametrize("i", range(N))
def test_over_ssh(i, app, kvm_guest):
    client = login(kvm_guest.address(22))
    try:
        if APP:
            assert run(client, "systemctl is-active kvmsnap-app; ls /var/lib/app | wc -l") == f"active\n{FILES}"
        if EXPECT_CLEAN:
            assert run(client, "cat /root/marker 2>/dev/null") == "", f"test {i} found the previous marker"
        run(client, f"echo {i} > /root/marker")
    finally:
        client.close()
