"""The clone's domain XML: new name, no UUID, own disk copies and sockets, ownership record."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import pytest

from pytest_kvmsnap.libvirt.clones import LibvirtClones, _clone_xml
from pytest_kvmsnap.libvirt.machine import LibvirtMachine
from pytest_kvmsnap.ownership import Owner, clone_name
from pytest_kvmsnap.records import CloneSource
from tests.conftest import TestDriver
from tests.unit.helpers import run_unit

ORIGINAL = """
<domain type='qemu'>
  <name>web</name><uuid>c96d224f-be81-4de4-b99a-67cc90194d0d</uuid>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/images/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/images/iso.img'/><target dev='vdb' bus='virtio'/><readonly/></disk>
    <serial type='unix'><source mode='bind' path='/run/sock/web.sock'/><target port='0'/></serial>
    <channel type='unix'><source mode='bind' path='/run/sock/agent'/><target type='virtio'/></channel>
    <console type='file'><source path='/var/log/web.console'/><log file='/var/log/console-web.log'/></console>
  </devices>
</domain>
"""


def test_clone_xml() -> None:
    source = CloneSource(directory="/images/web-kvmsnap-run1", disks={"vda": "vda.qcow2"},
                         domain_xml=ORIGINAL, snapshot_xml="<domainsnapshot/>", pool="web-kvmsnap-run1")
    owner = Owner("run1", 123, "host", time.time())
    name = clone_name("web", "run1", 0)
    root = _clone_xml(source, "web", name, owner, {"vda": f"/images/{name}/vda.qcow2"})
    assert name == "web-kvmsnap-run1-0"
    assert root.findtext("name") == name and root.find("uuid") is None
    assert Owner.from_description(root.findtext("description")) == owner
    sources = [d.find("source").get("file") for d in root.iterfind("devices/disk")]  # type: ignore[union-attr]
    assert sources == [f"/images/{name}/vda.qcow2", "/images/iso.img"]  # read-only: shared
    paths = [s.get("path") for s in root.iterfind("devices/*/source[@mode='bind']")]
    assert paths == [f"/run/sock/{name}.sock", f"/run/sock/agent.{name}"]
    assert ET.tostring(root, encoding="unicode").count("web.sock") == 0
    console = root.find("devices/console")
    assert console is not None
    assert console.find("source").get("path") == f"/var/log/{name}.console"  # type: ignore[union-attr]
    assert console.find("log").get("file") == f"/var/log/console-{name}.log"  # type: ignore[union-attr]


NETWORK_DISK = ("<disk type='network' device='disk'><driver name='qemu' type='qcow2'/>"
                "<source protocol='rbd' name='pool/web'><host name='ceph.example'/></source>"
                "<target dev='vdb' bus='virtio'/></disk>")


def test_clone_mode_refuses_a_network_disk_up_front(pytester: pytest.Pytester, testdriver: TestDriver) -> None:
    name = testdriver.define(extra=NETWORK_DISK)
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{name}")
        def test_x(kvm_guest):
            pass
    """)
    result = run_unit(pytester, "--kvm-clones=1")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*--kvm-clones copies disk image files, but disk vdb of '{name}' is a network "
                                 "disk (rbd:pool/web); clone mode cannot copy it. Drop --kvm-clones*"])
    assert testdriver.snapshots(name) == []


@pytest.mark.parametrize("name", ["web", "a'b\"c<d>&e", "ünïcode name"])
def test_pool_and_volume_names_are_data(name: str) -> None:
    from pytest_kvmsnap.libvirt import storage

    pool = ET.fromstring(storage._pool_xml(name, f"/images/{name}"))
    assert pool.findtext("name") == name and pool.findtext("target/path") == f"/images/{name}"
    volume = ET.fromstring(storage._volume_xml(name, 4096))
    assert volume.findtext("name") == name and volume.find("target/format").get("type") == "raw"  # type: ignore[union-attr]


def test_a_pool_without_the_plugins_owner_record_is_never_an_orphan(testdriver: TestDriver) -> None:
    """A pool named like a run's but without a readable owner volume is the user's: left alone."""
    name = testdriver.define()
    dom = testdriver.conn.lookupByName(name)
    pool = testdriver.conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}-kvmsnap-deadrun</name><target><path>/x/{name}</path></target></pool>", 0)
    try:
        clones_left, pools = LibvirtClones(testdriver.conn).orphans(LibvirtMachine(dom), lambda owner: True)
        assert (clones_left, pools) == ([], [])
    finally:
        pool.undefine()


@pytest.mark.parametrize("volume", [None, "disk.qcow2"])
def test_an_empty_ownerless_pool_of_a_run_known_dead_is_its_orphan(testdriver: TestDriver,
                                                                  volume: str | None) -> None:
    """A run killed between defining a pool and writing its owner volume (the first thing in it)
    left it ownerless and empty: once that run is known dead by what it owned (its snapshot on the
    guest), the pool is its orphan and removed.  One with anything in it is never touched."""
    from pytest_kvmsnap.libvirt import storage

    name = testdriver.define()
    clones, machine = LibvirtClones(testdriver.conn), LibvirtMachine(testdriver.conn.lookupByName(name))
    pool = testdriver.conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}-kvmsnap-deadrun-1</name><target><path>/x/{name}</path></target></pool>", 0)
    try:
        if volume:
            pool.create(0)
            pool.createXML(storage._volume_xml(volume, 4096), 0)
        found = clones.orphans(machine, lambda owner: True, frozenset({"deadrun"}))
        assert found == ([], [] if volume else [f"{name}-kvmsnap-deadrun-1"])
        assert clones.orphans(machine, lambda owner: True, frozenset({"otherrun"})) == ([], [])
        if not volume:
            clones.remove_pool(f"{name}-kvmsnap-deadrun-1")
            assert f"{name}-kvmsnap-deadrun-1" not in testdriver.conn.listStoragePools() + \
                testdriver.conn.listDefinedStoragePools()
    finally:
        for pool in testdriver.conn.listAllStoragePools():
            if pool.name().startswith(f"{name}-kvmsnap-"):
                if pool.isActive():
                    for vol in pool.listAllVolumes(0):
                        vol.delete(0)
                    pool.destroy()
                pool.undefine()
