"""Tests that install, break and fill things in the guest, and rely on the revert."""

import pytest

# Every test in this module gets the guest as it was when the session started.
pytestmark = pytest.mark.kvm_snapshot


def test_install_a_package(sh):
    assert sh.run("test -e /data/opt/tool/bin/tool").status != 0, "left over from an earlier test"
    sh.check("mkdir -p /data/opt/tool/bin && printf '#!/bin/sh\\necho v1\\n' > /data/opt/tool/bin/tool")
    sh.check("chmod +x /data/opt/tool/bin/tool")
    assert sh.check("/data/opt/tool/bin/tool") == "v1"


def test_corrupt_a_config_file(sh):
    assert sh.check("cat /data/hello.txt") == "pristine data disk"
    sh.check("echo 'garbage ###' > /data/hello.txt")
    assert "garbage" in sh.check("cat /data/hello.txt")


def test_fill_the_disk(sh):
    sh.run("dd if=/dev/zero of=/data/filler bs=1M count=64")  # fails when full: that is the point
    assert sh.check("df /data | tail -1 | awk '{print $4}'") == "0"


def test_disk_is_not_full_anymore(sh):
    free_kib = int(sh.check("df /data | tail -1 | awk '{print $4}'"))
    assert free_kib > 10_000


def test_state_in_ram_is_gone_too(sh):
    assert sh.run("test -e /tmp/session-token").status != 0
    sh.check("echo secret > /tmp/session-token")


def test_break_the_data_mount(sh):
    sh.check("mount -o remount,ro /data")
    assert sh.run("touch /data/x").status != 0


def test_data_mount_is_writable_again(sh):
    sh.check("touch /data/x")


@pytest.mark.kvm_snapshot(scope="class")
class TestMigration:
    """A class shares one guest state: step two builds on step one."""

    def test_step_one_creates_schema(self, sh):
        sh.check("echo 'CREATE TABLE t' > /data/schema.sql")

    def test_step_two_sees_schema(self, sh):
        assert sh.check("cat /data/schema.sql") == "CREATE TABLE t"


def test_schema_from_the_class_is_gone(sh):
    assert sh.run("test -e /data/schema.sql").status != 0
