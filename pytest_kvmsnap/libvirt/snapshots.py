"""Internal snapshots: the run's baseline and layers with their ownership record, the user's
kept states, and what a cut-off snapshot job left.
"""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from pytest_kvmsnap.exceptions import (
    ConnectionLost,
    KvmSnapError,
    SnapshotNotFound,
    UnsupportedGuest,
)
from pytest_kvmsnap.libvirt.connection import is_lost_connection, is_this_host, lib, unless_missing
from pytest_kvmsnap.libvirt.preflight import writable_disks
from pytest_kvmsnap.libvirt.qemu import hmp
from pytest_kvmsnap.ownership import Owner, owner_description

if TYPE_CHECKING:
    import libvirt


def lookup_snapshot(dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot:
    """The snapshot called ``name``; if there is none, an error that lists the guest's snapshots."""
    snap = find_snapshot(dom, name)
    if snap is None:
        raise SnapshotNotFound(name, dom.name(), dom.snapshotListNames())
    return snap


# --- ownership -------------------------------------------------------------


def snapshot_description(snap: libvirt.virDomainSnapshot) -> str:
    """The snapshot's description: where the plugin's ownership and kept marks live."""
    return ET.fromstring(snap.getXMLDesc(0)).findtext("description") or ""


def snapshot_state(snap: libvirt.virDomainSnapshot) -> str:
    """The guest state the snapshot recorded: running, paused, shutoff ..."""
    return ET.fromstring(snap.getXMLDesc(0)).findtext("state") or "unknown"


def create_baseline(dom: libvirt.virDomain, name: str, owner: Owner) -> libvirt.virDomainSnapshot:
    """Take an internal snapshot: memory and disks when running, disks when off."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = owner_description(owner)
    xml = ET.tostring(root, encoding="unicode")
    libvirt = lib()
    try:
        return dom.snapshotCreateXML(xml, 0)
    except libvirt.libvirtError as exc:
        if is_lost_connection(exc):
            raise ConnectionLost(dom.connect().getURI(), f"taking the baseline snapshot of {dom.name()!r}",
                                 str(exc)) from None
        # The qcow2/pflash advice is for libvirt's refusals of internal
        # snapshots, not for every failure (a busy or lost daemon is not one).
        if exc.get_error_code() in (libvirt.VIR_ERR_OPERATION_UNSUPPORTED, libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
                                    libvirt.VIR_ERR_NO_SUPPORT):
            raise UnsupportedGuest(
                f"cannot take a baseline snapshot of {dom.name()!r}: {exc}. "
                "pytest-kvmsnap needs internal snapshots: qcow2 disks, and no pflash firmware "
                "on libvirt older than 10.10."
            ) from None
        raise KvmSnapError(f"cannot take a baseline snapshot of {dom.name()!r}: {exc}{_space_hint(dom)}") from None


LOW_SPACE = 256 * 2**20  # bytes free below which a failed snapshot is blamed on the disk's file system


def _space_hint(dom: libvirt.virDomain) -> str:
    """Which disk's file system is (nearly) full, when one is: the snapshot goes into its image."""
    hints = []
    for disk in writable_disks(ET.fromstring(dom.XMLDesc(0))):
        source, target = disk.find("source"), disk.find("target")
        path = source.get("file") if source is not None else None
        if not path or not is_this_host(dom.connect()):
            continue
        try:
            free = shutil.disk_usage(os.path.dirname(path)).free
        except OSError:
            continue
        if free < LOW_SPACE:
            hints.append(f"disk {target.get('dev') if target is not None else '?'} ({path}) is on a file system "
                         f"with {free / 2**20:.0f} MiB free, and the snapshot stores the guest's memory "
                         "in that image: free space there")
    return "; " + "; ".join(hints) if hints else ""


def find_snapshot(dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot | None:
    """The snapshot called ``name``, or None (no listing of the user's snapshots)."""
    return unless_missing(lambda: dom.snapshotLookupByName(name), lib().VIR_ERR_NO_DOMAIN_SNAPSHOT)


def resume_if_paused_by_snapshot(dom: libvirt.virDomain) -> None:
    """Resume a guest libvirt paused for a snapshot job that was cut off mid-way."""
    libvirt = lib()
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT:
        dom.resume()


def qemu_holds_vm_state(dom: libvirt.virDomain, name: str) -> bool:
    """Does the running QEMU list internal snapshot ``name`` with saved VM state?

    libvirt lists a snapshot from its own metadata; this asks QEMU itself, so
    a snapshot whose savevm was cut short is not mistaken for a complete one.
    """
    if not dom.connect().getType().upper().startswith("QEMU"):
        return True  # no monitor to ask: libvirt's listing is all there is
    for line in hmp(dom, "info snapshots").splitlines():
        fields = line.split()
        # ID TAG VM-SIZE UNIT DATE TIME VM-CLOCK [ICOUNT]; a disk-only one has VM SIZE 0 B.
        if len(fields) >= 4 and fields[1] == name:
            return fields[2] not in ("0", "0.0")
    return False


def delete_snapshot(snap: libvirt.virDomainSnapshot) -> None:
    snap.delete(0)


def create_kept(dom: libvirt.virDomain, name: str, description: str) -> None:
    """Save the guest's state now (memory too while it runs) as snapshot ``name``, with the kept mark
    ``description`` (ownership.kept_description)."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = description
    dom.snapshotCreateXML(ET.tostring(root, encoding="unicode"), 0)


def redescribe(snap: libvirt.virDomainSnapshot, description: str) -> None:
    """Replace the snapshot's description in place (libvirt's redefine): how a baseline the user
    asked to keep (``--kvm-keep-snapshot``) gets the kept mark, so that no later run takes it for
    a dead run's orphan and reverts to it or deletes it."""
    root = ET.fromstring(snap.getXMLDesc(0))
    element = root.find("description")
    if element is None:
        element = ET.SubElement(root, "description")
    element.text = description
    snap.getDomain().snapshotCreateXML(ET.tostring(root, encoding="unicode"),
                                       lib().VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
