"""The same with pytest-testinfra and fabric: ``kvm_testinfra`` is testinfra's ``Host`` for
the test's guest and ``kvm_fabric`` a fabric ``Connection`` to it, both with ``--kvm-ssh-user``
and ``--kvm-ssh-key``, both fresh after every revert (pip install 'pytest-kvmsnap[testinfra]' fabric).
"""

import pytest

pytestmark = pytest.mark.kvm_snapshot


def test_testinfra_finds_a_whole_guest_and_breaks_it(kvm_testinfra):
    assert kvm_testinfra.file("/etc/hostname").exists, "left over from an earlier test"
    assert kvm_testinfra.package("openssh-server").is_installed
    kvm_testinfra.run("rm /etc/hostname")
    assert not kvm_testinfra.file("/etc/hostname").exists


def test_fabric_finds_it_whole_again(kvm_fabric):
    assert kvm_fabric.run("cat /etc/hostname", hide=True).stdout.strip() == "kvmsnap-debian"
