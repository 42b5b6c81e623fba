"""Per-worker clones (``--kvm-clones``): each worker gets its own copy of a guest.

Instead of taking turns on one guest, each xdist worker (or each of N slots)
runs its tests on a clone named ``<domain>-kvmsnap-<run>-<slot>`` that starts
exactly at the original's baseline, memory included:

1. Once per run, under the original's lock: take the usual internal baseline
   snapshot of the original, pause it (QEMU flushes its qcow2 metadata when it
   stops), copy each writable disk image -- the snapshot and its memory state
   are inside -- into ``kvmsnap-<run>/`` beside the first disk, resume it and
   delete the snapshot.  The original was paused for the copy and is otherwise
   as found; tests never touch it.
2. Per clone: copy those images again (``cp --reflink=auto``: instant on
   XFS/btrfs), start a transient domain from the original's XML with a new
   name, no UUID and the copies as disks, paused; redefine the baseline
   snapshot on it and revert to it, which restarts that QEMU with the
   baseline's memory.  From then on the clone is an ordinary guest: its
   per-test reverts are in-place ``loadvm``.

libvirt cannot restore one guest's saved memory into a domain with another
UUID, and QEMU can only ``loadvm`` an internal snapshot of the top image, not of
a backing file: hence full (reflinked where possible) copies, not overlays.
At the end the run's finisher destroys the clones (transient: nothing stays
defined) and deletes the directory; a killed run's clones and directory are
found by their ownership records and removed by the next run.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_kvmsnap import backend
from pytest_kvmsnap.exceptions import UnsupportedGuest
from pytest_kvmsnap.locking import CloneSource

if TYPE_CHECKING:
    import libvirt

MARK = "-kvmsnap-"
OWNER_FILE = "owner.json"


def clone_name(domain: str, run_id: str, slot: int) -> str:
    return f"{domain}{MARK}{run_id}-{slot}"


def check_local(conn: libvirt.virConnect) -> None:
    """The disk copies are made by this process: the hypervisor must be this host."""
    if not backend.is_this_host(conn):
        raise UnsupportedGuest(
            f"--kvm-clones copies disk images on this host, but {conn.getURI()} runs on "
            f"{conn.getHostname()}; run pytest on the hypervisor host, or drop --kvm-clones"
        )


def check_copyable(dom: libvirt.virDomain) -> None:
    """Every disk the guest writes must be a file this process can copy: refused up front,
    not halfway through with cp's error."""
    for disk in backend.writable_disks(ET.fromstring(dom.XMLDesc(0))):
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


def _xml_flags() -> int:
    libvirt = backend.lib()
    return int(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)


def _writable_disks(root: ET.Element) -> list[ET.Element]:
    """The disks to copy: those the guest writes to (see backend) that have a source."""
    return [d for d in backend.writable_disks(root) if d.find("source") is not None]


def _copy(source: str | Path, target: Path) -> None:
    # argv, not a shell string; reflinks make this instant where the fs can.
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(source), str(target)],
                   check=True, capture_output=True)


# --- once per run: the source images --------------------------------------


def make_source(dom: libvirt.virDomain, snap: libvirt.virDomainSnapshot, owner: backend.Owner) -> CloneSource:
    """Copy the original's writable disks, baseline snapshot inside, while it is paused."""
    libvirt = backend.lib()
    root = ET.fromstring(dom.XMLDesc(_xml_flags()))
    disks = _writable_disks(root)
    directory = Path(disks[0].find("source").get("file", "")).parent / f"kvmsnap-{owner.run_id}"  # type: ignore[union-attr]
    directory.mkdir(mode=0o755)
    (directory / OWNER_FILE).write_text(owner.to_json())
    pause = dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    if pause:
        dom.suspend()  # QEMU flushes the image metadata when it stops: the copy is consistent
    try:
        copies = {}
        for disk in disks:
            target = disk.find("target").get("dev", "")  # type: ignore[union-attr]
            copies[target] = str(directory / f"{target}.qcow2")
            _copy(disk.find("source").get("file", ""), Path(copies[target]))  # type: ignore[union-attr]
    finally:
        if pause:
            dom.resume()
    return CloneSource(str(directory), copies, snap.getXMLDesc(libvirt.VIR_DOMAIN_XML_SECURE),
                       ET.tostring(root, encoding="unicode"))


def remove_source(source: CloneSource) -> None:
    shutil.rmtree(source.directory, ignore_errors=True)


# --- per clone ---------------------------------------------------------------


def make_clone(conn: libvirt.virConnect, source: CloneSource, original: str, name: str,
               owner: backend.Owner) -> tuple[libvirt.virDomain, libvirt.virDomainSnapshot]:
    """Start clone ``name`` at the baseline; return it and its baseline snapshot."""
    libvirt = backend.lib()
    root = _clone_xml(source, original, name, owner)
    dom = conn.createXML(ET.tostring(root, encoding="unicode"), libvirt.VIR_DOMAIN_START_PAUSED)
    try:
        snap = _redefine_snapshot(dom, source.snapshot_xml)
        dom.revertToSnapshot(snap, 0)  # a new QEMU, started with -loadvm: memory too
    except BaseException:
        destroy(conn, name)
        raise
    return dom, snap


def _redefine_snapshot(dom: libvirt.virDomain, snapshot_xml: str) -> libvirt.virDomainSnapshot:
    """Give ``dom`` the metadata of an internal snapshot its disk copies already hold
    (taken on another domain): the snapshot's domain XML becomes ``dom``'s own."""
    snap_root = ET.fromstring(snapshot_xml)
    for tag in ("domain", "inactiveDomain", "parent"):
        for element in snap_root.findall(tag):
            snap_root.remove(element)
    snap_root.append(ET.fromstring(dom.XMLDesc(_xml_flags())))
    return dom.snapshotCreateXML(ET.tostring(snap_root, encoding="unicode"),
                                 backend.lib().VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)


def _clone_xml(source: CloneSource, original: str, name: str, owner: backend.Owner) -> ET.Element:
    root = ET.fromstring(source.domain_xml)
    root.find("name").text = name  # type: ignore[union-attr]
    for element in root.findall("uuid"):
        root.remove(element)  # libvirt picks a new one
    description = root.find("description")
    if description is None:
        description = ET.SubElement(root, "description")
    description.text = backend.owner_description(owner)
    directory = Path(source.directory)
    for disk in _writable_disks(root):
        target = disk.find("target").get("dev", "")  # type: ignore[union-attr]
        copy = directory / f"{name}-{target}.qcow2"
        _copy(source.disks[target], copy)
        disk.find("source").set("file", str(copy))  # type: ignore[union-attr]
    # Unix sockets QEMU listens on (serial consoles, channels) and files it
    # writes (a serial console to a file, a character device's log) must differ
    # from the original's; where the path names the domain, name the clone.
    own_paths = [*root.iterfind("devices/*/source[@mode='bind']"), *root.iterfind("devices/*[@type='file']/source"),
                 *root.iterfind("devices/*/log")]
    for element in own_paths:
        attribute = "file" if element.tag == "log" else "path"
        path = element.get(attribute)
        if path:
            base = Path(path)
            renamed = base.name.replace(original, name) if original in base.name else f"{base.name}.{name}"
            element.set(attribute, str(base.with_name(renamed)))
    return root


def destroy(conn: libvirt.virConnect, name: str) -> None:
    """Stop a clone (transient: it is gone then) and delete its disk copies."""
    libvirt = backend.lib()
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    root = ET.fromstring(dom.XMLDesc(0))
    persistent = dom.isPersistent()  # never made so by the plugin; a user may have
    if dom.isActive():
        dom.destroy()  # a transient domain is gone from here on
    if persistent:
        for snap in dom.listAllSnapshots():
            snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        dom.undefine()
    for disk in _writable_disks(root):
        path = Path(disk.find("source").get("file", ""))  # type: ignore[union-attr]
        if path.parent.name.startswith("kvmsnap-") and path.name.startswith(name):
            path.unlink(missing_ok=True)


# --- a clone kept for the user (--kvm-keep-failed) ---------------------------

KEPT_MARK = "-kept-"


def kept_clone_name(clone: str) -> str:
    """The shut-off domain a clone with kept failed states becomes after the run: not a
    clone's name (recovery looks for those), and the same in every process of the run."""
    return clone.replace(MARK, KEPT_MARK, 1)


def kept_directory(dom: libvirt.virDomain) -> Path:
    """Where a kept clone's disks go: beside the run's copies, named after the kept domain."""
    disk = _writable_disks(ET.fromstring(dom.XMLDesc(0)))[0]
    return Path(disk.find("source").get("file", "")).parent.with_name(  # type: ignore[union-attr]
        f"kvmsnap{KEPT_MARK}{kept_clone_name(dom.name())}")


def keep(conn: libvirt.virConnect, name: str, snapshots: list[str], record: dict[str, object]) -> str:
    """Turn clone ``name`` into a defined, shut-off domain that keeps its disks and ``snapshots``.

    A clone is transient, and its disk copies live in the run's directory, which
    the run deletes; so its QEMU is stopped, its disks moved to a directory of
    their own and a persistent domain defined on them, marked kept for the user
    (``record`` goes into that mark), with the kept snapshots' metadata redefined on it.
    ``virsh snapshot-revert`` then starts it from a kept state, memory included.
    """
    libvirt = backend.lib()
    dom = conn.lookupByName(name)
    root = ET.fromstring(dom.XMLDesc(_xml_flags()))
    snapshot_xml = [dom.snapshotLookupByName(snap).getXMLDesc(libvirt.VIR_DOMAIN_XML_SECURE) for snap in snapshots]
    kept, directory = kept_clone_name(name), kept_directory(dom)
    if dom.isActive():
        dom.destroy()  # transient: the domain and its snapshot metadata are gone, its disks stay
    root.find("name").text = kept  # type: ignore[union-attr]
    root.find("description").text = backend.kept_description(record)  # type: ignore[union-attr]
    directory.mkdir(mode=0o755, exist_ok=True)
    for disk in _writable_disks(root):
        source = disk.find("source")
        path = Path(source.get("file", ""))  # type: ignore[union-attr]
        path.rename(directory / path.name)  # the same file system: no copy
        source.set("file", str(directory / path.name))  # type: ignore[union-attr]
    kept_dom = conn.defineXML(ET.tostring(root, encoding="unicode"))
    for xml in snapshot_xml:
        _redefine_snapshot(kept_dom, xml)
    return kept


# --- orphans ----------------------------------------------------------------


def orphans(conn: libvirt.virConnect, dom: libvirt.virDomain,
            dead: Callable[[backend.Owner], bool]) -> tuple[list[str], list[Path]]:
    """Clones and source directories of ``dom`` that dead runs left."""
    prefix = dom.name() + MARK
    clones = []
    for other in conn.listAllDomains():
        if other.name().startswith(prefix):
            owner = backend.Owner.from_description(ET.fromstring(other.XMLDesc(0)).findtext("description"))
            if owner is not None and dead(owner):
                clones.append(other.name())
    directories = []
    for disk in _writable_disks(ET.fromstring(dom.XMLDesc(0))):
        parent = Path(disk.find("source").get("file", "")).parent  # type: ignore[union-attr]
        for owner_file in parent.glob(f"kvmsnap-*/{OWNER_FILE}"):
            owner = backend.Owner.from_json(owner_file.read_text())
            if owner is not None and dead(owner):
                directories.append(owner_file.parent)
    return clones, sorted(set(directories))
