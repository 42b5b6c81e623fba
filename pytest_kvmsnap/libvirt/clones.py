"""Per-worker clones (``--kvm-clones``): each worker gets its own copy of a guest.

Instead of taking turns on one guest, each xdist worker (or each of N slots)
runs its tests on a clone named ``<domain>-kvmsnap-<run>-<slot>`` that starts
exactly at the original's baseline, memory included:

1. Once per run, under the original's lock: take the usual internal baseline
   snapshot of the original, pause it (QEMU flushes its qcow2 metadata when it
   stops), copy each writable disk image -- the snapshot and its memory state
   are inside -- into the run's pool ``<domain>-kvmsnap-<run>`` (a directory
   beside the first disk), resume it and delete the snapshot.  The original was
   paused for the copy and is otherwise as found; tests never touch it.
2. Per clone, in the worker that uses it (so a run's clones start at the same
   time): copy those images again into the clone's own pool, named as the
   clone; start a transient domain from the original's XML with the new name,
   no UUID and the copies as disks, paused; redefine the baseline snapshot on
   it and revert to it, which restarts that QEMU with the baseline's memory.
   From then on the clone is an ordinary guest: its per-test reverts are
   in-place ``loadvm``.

Every copy goes through libvirt's storage API (storage.py), so the hypervisor
may be another host.  libvirt cannot restore one guest's saved memory into a
domain with another UUID, and QEMU can only ``loadvm`` an internal snapshot of
the top image, not of a backing file: hence full copies, not overlays.  At the
end the run's finisher destroys the clones (transient: nothing stays defined)
and removes their pools; a killed run's clones and pools are found by their
ownership records and removed by the next run.  :class:`LibvirtClones` is the
engine's :class:`~pytest_kvmsnap.engine.Clones`.
"""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING

from pytest_kvmsnap.engine import Machine, Snapshot
from pytest_kvmsnap.exceptions import UnsupportedGuest
from pytest_kvmsnap.libvirt import connection, preflight, storage
from pytest_kvmsnap.libvirt.machine import LibvirtMachine, native_domain
from pytest_kvmsnap.libvirt.snapshots import LibvirtSnapshot, native_snapshot
from pytest_kvmsnap.ownership import MARK, Owner, kept_clone_name, kept_description, owner_description
from pytest_kvmsnap.records import CloneSource

if TYPE_CHECKING:
    import libvirt

def source_pool_name(domain: str, run_id: str) -> str:
    """The run's pool of the original's copies (a clone's pool is named as the clone)."""
    return f"{domain}{MARK}{run_id}"

def _xml_flags() -> int:
    libvirt = connection.lib()
    return int(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)

def _writable_disks(root: ET.Element) -> list[ET.Element]:
    """The disks to copy: those the guest writes to (see backend) that have a source."""
    return [d for d in preflight.writable_disks(root) if d.find("source") is not None]

def _disk_file(disk: ET.Element) -> str:
    return disk.find("source").get("file", "")  # type: ignore[union-attr]

def _disk_target(disk: ET.Element) -> str:
    return disk.find("target").get("dev", "")  # type: ignore[union-attr]

def _new_pool(conn: libvirt.virConnect, parent: str, name: str, owner: Owner) -> libvirt.virStoragePool:
    """A new pool ``name`` of the run's, in a directory of that name in ``parent``."""
    return storage.make_pool(conn, name, posixpath.join(parent, name), owner)

def _copy_disks(conn: libvirt.virConnect, source: CloneSource, name: str, owner: Owner) -> dict[str, str]:
    """Copy the run's images into clone ``name``'s own pool; return target device -> file."""
    origin = conn.storagePoolLookupByName(source.pool)
    pool = _new_pool(conn, posixpath.dirname(source.directory), name, owner)
    return {target: storage.copy(origin.storageVolLookupByName(volume), pool, volume).path()
            for target, volume in source.disks.items()}

def _redefine_snapshot(dom: libvirt.virDomain, snapshot_xml: str) -> libvirt.virDomainSnapshot:
    """Give ``dom`` the metadata of an internal snapshot its disk copies already hold
    (taken on another domain): the snapshot's domain XML becomes ``dom``'s own."""
    snap_root = ET.fromstring(snapshot_xml)
    for tag in ("domain", "inactiveDomain", "parent"):
        for element in snap_root.findall(tag):
            snap_root.remove(element)
    snap_root.append(ET.fromstring(dom.XMLDesc(_xml_flags())))
    return dom.snapshotCreateXML(ET.tostring(snap_root, encoding="unicode"),
                                 connection.lib().VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)

def _clone_xml(source: CloneSource, original: str, name: str, owner: Owner,
               disk_files: dict[str, str]) -> ET.Element:
    """The original's XML with a new name, no UUID, the plugin's ownership record, the
    clone's disk copies (``disk_files``: target device -> file) and its own sockets and logs."""
    root = ET.fromstring(source.domain_xml)
    root.find("name").text = name  # type: ignore[union-attr]
    for element in root.findall("uuid"):
        root.remove(element)  # libvirt picks a new one
    description = root.find("description")
    if description is None:
        description = ET.SubElement(root, "description")
    description.text = owner_description(owner)
    for disk in _writable_disks(root):
        disk.find("source").set("file", disk_files[_disk_target(disk)])  # type: ignore[union-attr]
    # Unix sockets QEMU listens on (serial consoles, channels) and files it
    # writes (a serial console to a file, a character device's log) must differ
    # from the original's; where the path names the domain, name the clone.
    own_paths = [*root.iterfind("devices/*/source[@mode='bind']"), *root.iterfind("devices/*[@type='file']/source"),
                 *root.iterfind("devices/*/log")]
    for element in own_paths:
        attribute = "file" if element.tag == "log" else "path"
        path = element.get(attribute)
        if path:
            base = posixpath.basename(path)
            renamed = base.replace(original, name) if original in base else f"{base}.{name}"
            element.set(attribute, posixpath.join(posixpath.dirname(path), renamed))
    return root



class LibvirtClones:
    """Clones at the hypervisor of connection ``conn``, through its storage API and transient domains."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn

    def check_copyable(self, machine: Machine) -> None:
        """Every disk the guest writes must be a file this process can copy: refused up front,
        not halfway through with cp's error."""
        dom = native_domain(machine)
        for disk in preflight.writable_disks(ET.fromstring(dom.XMLDesc(0))):
            if disk.get("type", "file") == "file":
                continue
            target = disk.find("target")
            source = disk.find("source")
            where = ""
            if source is not None:
                detail = source.get("protocol") or source.get("dev") or source.get("pool") or ""
                where = f" ({detail}{':' + source.get('name', '') if source.get('name') else ''})" if detail else ""
            raise UnsupportedGuest(
                f"--kvm-clones copies disk image files, but disk {target.get('dev') if target is not None else '?'} "
                f"of {dom.name()!r} is a {disk.get('type')} disk{where}; clone mode cannot copy it. "
                "Drop --kvm-clones (workers then take turns on the guest), or give the test guest file disks."
            )

    # once per run: the source images

    def make_source(self, machine: Machine, baseline: Snapshot, owner: Owner) -> CloneSource:
        """Copy the original's writable disks, baseline snapshot inside, while it is paused."""
        libvirt = connection.lib()
        dom = native_domain(machine)
        root = ET.fromstring(dom.XMLDesc(_xml_flags()))
        disks = _writable_disks(root)
        name = source_pool_name(dom.name(), owner.run_id)
        pool = _new_pool(self.conn, posixpath.dirname(_disk_file(disks[0])), name, owner)
        copies = {_disk_target(disk): f"{_disk_target(disk)}.qcow2" for disk in disks}
        paused = False
        try:
            if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                dom.suspend()  # QEMU flushes the image metadata when it stops: the copy is consistent
                paused = True
            for disk in disks:
                storage.copy_file(self.conn, _disk_file(disk), pool, copies[_disk_target(disk)], f"{name}-read")
        except BaseException:
            storage.remove_pool(pool)
            raise
        finally:
            if paused:  # only what this resumes was paused here: a failed suspend is the error to see
                dom.resume()
        snapshot_xml = native_snapshot(baseline).getXMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
        return CloneSource(storage.pool_path(pool), copies, snapshot_xml, ET.tostring(root, encoding="unicode"),
                           pool=name)

    def remove_source(self, source: CloneSource) -> None:
        self.remove_pool(source.pool)

    def remove_pool(self, name: str) -> None:
        """Remove pool ``name`` if it is there and the plugin's: its owner volume says so, or it has
        none and is empty (a run killed between defining it and writing that volume, the first
        thing written into it: see :meth:`orphans`)."""
        try:
            pool = self.conn.storagePoolLookupByName(name)
        except connection.lib().libvirtError:
            return
        if storage.pool_owner(pool) is not None or storage.is_empty(pool):
            storage.remove_pool(pool)

    # per clone

    def make_clone(self, source: CloneSource, original: str, name: str, owner: Owner) -> tuple[Machine, Snapshot]:
        """Start clone ``name`` at the baseline; return it and its baseline snapshot."""
        libvirt = connection.lib()
        try:
            root = _clone_xml(source, original, name, owner, _copy_disks(self.conn, source, name, owner))
            dom = self.conn.createXML(ET.tostring(root, encoding="unicode"), libvirt.VIR_DOMAIN_START_PAUSED)
            snap = _redefine_snapshot(dom, source.snapshot_xml)
            dom.revertToSnapshot(snap, 0)  # a new QEMU, started with -loadvm: memory too
        except BaseException:
            self.destroy(name)
            raise
        return LibvirtMachine(dom), LibvirtSnapshot(snap)

    def destroy(self, name: str) -> None:
        """Stop a clone (transient: it is gone then) and remove its pool of disk copies."""
        libvirt = connection.lib()
        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError:
            dom = None  # gone already (QEMU died, libvirtd restarted); its pool may not be
        if dom is not None:
            persistent = dom.isPersistent()  # never made so by the plugin; a user may have
            if dom.isActive():
                dom.destroy()  # a transient domain is gone from here on
            if persistent:
                for snap in dom.listAllSnapshots():
                    snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                dom.undefine()
        self.remove_pool(name)

    # a clone kept for the user (--kvm-keep-failed)

    def keep(self, name: str, snapshots: list[str], record: dict[str, object]) -> str:
        """Turn clone ``name`` into a defined, shut-off domain that keeps its disks and ``snapshots``.

        A clone is transient, and its pool is removed with it; so its QEMU is
        stopped, its pool handed to the user (its owner volume deleted: no run's
        leftover now, the pool and its disks stay), and a persistent domain defined on them,
        marked kept for the user (``record`` goes into that mark), with the kept
        snapshots' metadata redefined on it.  ``virsh snapshot-revert`` then starts it
        from a kept state, memory included.
        """
        libvirt = connection.lib()
        dom = self.conn.lookupByName(name)
        root = ET.fromstring(dom.XMLDesc(_xml_flags()))
        snapshot_xml = [dom.snapshotLookupByName(snap).getXMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
                        for snap in snapshots]
        kept = kept_clone_name(name)
        if dom.isActive():
            dom.destroy()  # transient: the domain and its snapshot metadata are gone, its disks stay
        root.find("name").text = kept  # type: ignore[union-attr]
        root.find("description").text = kept_description(record)  # type: ignore[union-attr]
        kept_dom = self.conn.defineXML(ET.tostring(root, encoding="unicode"))
        for xml in snapshot_xml:
            _redefine_snapshot(kept_dom, xml)
        # Last: until here, a failure leaves the pool the run's, removed with the clone.
        self.conn.storagePoolLookupByName(name).storageVolLookupByName(storage.OWNER_VOLUME).delete(0)
        return kept

    # orphans

    def orphans(self, machine: Machine, dead: Callable[[Owner], bool],
                dead_runs: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
        """Clones of ``machine`` that dead runs left, and their other pools (copies of it, or
        a clone's copies whose domain is gone).

        ``dead_runs``: ids of runs already known dead (by their snapshots on the guest).  A run
        killed between defining a pool and writing its owner volume left a pool with no owner
        and nothing in it; it is taken for that run's when its name is the run's
        (``<guest>-kvmsnap-<run>[-<slot>]``) and the run is known dead by something it owned.
        """
        prefix = machine.name + MARK
        runs = set(dead_runs)
        clones = []
        for other in self.conn.listAllDomains():
            if other.name().startswith(prefix):
                owner = Owner.from_description(ET.fromstring(other.XMLDesc(0)).findtext("description"))
                if owner is not None and dead(owner):
                    clones.append(other.name())
                    runs.add(owner.run_id)
        pools, ownerless = [], []
        for pool in storage.pools(self.conn, prefix):
            owner = storage.pool_owner(pool)
            if owner is None:
                ownerless.append(pool)
            elif dead(owner):
                runs.add(owner.run_id)
                if pool.name() not in clones:  # a clone's goes with it
                    pools.append(pool.name())
        for pool in ownerless:
            run = pool.name()[len(prefix):].split("-")[0]
            if run in runs and pool.name() not in clones and storage.is_empty(pool):
                pools.append(pool.name())
        return clones, sorted(pools)
