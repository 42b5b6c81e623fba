"""A real distribution, damaged on purpose over SSH; each test finds it as the baseline left it.

``kvm_ssh`` is the guest's SSH client: ``run``, ``put``, ``get``; one connection,
opened again after every revert (a revert rewinds the guest's TCP state).  Run
against a guest with sshd, e.g. pytest-kvmsnap's Debian test guest:

    pytest examples/ssh --kvm-domain=<guest> --kvm-ssh-key=<private key> --kvm-wait=ssh
"""

import pytest

pytestmark = pytest.mark.kvm_snapshot


def test_remove_the_os_identity(kvm_ssh):
    assert kvm_ssh.run("cat /etc/os-release", check=False).ok, "left over from an earlier test"
    kvm_ssh.run("rm /etc/os-release /usr/lib/os-release")
    assert not kvm_ssh.run("cat /etc/os-release", check=False).ok


def test_break_a_service_for_good(kvm_ssh):
    assert kvm_ssh.run("systemctl is-active systemd-journald").stdout == "active", "left over from an earlier test"
    kvm_ssh.run("systemctl mask --now systemd-journald.socket systemd-journald")
    assert kvm_ssh.run("systemctl is-active systemd-journald", check=False).stdout != "active"


def test_corrupt_the_package_database(kvm_ssh):
    assert kvm_ssh.run("dpkg -s openssh-server", check=False).ok, "left over from an earlier test"
    kvm_ssh.run("echo 'garbage ###' > /var/lib/dpkg/status")
    assert not kvm_ssh.run("dpkg -s openssh-server", check=False).ok


def test_guest_is_whole_again(kvm_ssh):
    assert kvm_ssh.run("cat /etc/os-release", check=False).ok
    assert kvm_ssh.run("systemctl is-active systemd-journald").stdout == "active"
    assert kvm_ssh.run("dpkg -s openssh-server", check=False).ok
