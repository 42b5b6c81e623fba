"""A real distribution, damaged on purpose over SSH; each test finds it as the baseline left it."""

import pytest

pytestmark = pytest.mark.kvm_snapshot


def test_remove_the_os_identity(ssh):
    assert ssh("cat /etc/os-release")[0] == 0, "left over from an earlier test"
    assert ssh("rm /etc/os-release /usr/lib/os-release")[0] == 0
    assert ssh("cat /etc/os-release")[0] != 0


def test_break_a_service_for_good(ssh):
    assert ssh("systemctl is-active systemd-journald")[1] == "active", "left over from an earlier test"
    assert ssh("systemctl mask --now systemd-journald.socket systemd-journald")[0] == 0
    assert ssh("systemctl is-active systemd-journald")[1] != "active"


def test_corrupt_the_package_database(ssh):
    assert ssh("dpkg -s openssh-server")[0] == 0, "left over from an earlier test"
    ssh("echo 'garbage ###' > /var/lib/dpkg/status")
    assert ssh("dpkg -s openssh-server")[0] != 0


def test_guest_is_whole_again(ssh):
    assert ssh("cat /etc/os-release")[0] == 0
    assert ssh("systemctl is-active systemd-journald")[1] == "active"
    assert ssh("dpkg -s openssh-server")[0] == 0
