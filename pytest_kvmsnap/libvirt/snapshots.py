"""Internal snapshots: the run's baseline and layers with their ownership record, the user's
kept states, and what a cut-off snapshot job left.

:class:`DomainSnapshots` is the snapshot part of a
:class:`~pytest_kvmsnap.libvirt.machine.LibvirtMachine`; :class:`LibvirtSnapshot`
is a snapshot as the engine interface hands it out.
"""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, cast

from pytest_kvmsnap.engine import Snapshot
from pytest_kvmsnap.exceptions import (
    KvmSnapError,
    RevertFailed,
    SnapshotNotFound,
    UnsupportedGuest,
)
from pytest_kvmsnap.libvirt.advice import VirshAdvice
from pytest_kvmsnap.libvirt.connection import is_lost_connection, is_this_host, lib, lost, unless_missing
from pytest_kvmsnap.libvirt.preflight import writable_disks
from pytest_kvmsnap.libvirt.qemu import hmp
from pytest_kvmsnap.ownership import Owner, owner_description

if TYPE_CHECKING:
    import libvirt


class LibvirtSnapshot:
    """A libvirt domain snapshot; its description is where the plugin's ownership and kept marks live."""

    def __init__(self, snap: libvirt.virDomainSnapshot) -> None:
        self.native = snap

    @property
    def name(self) -> str:
        return str(self.native.getName())

    def description(self) -> str:
        return ET.fromstring(self.native.getXMLDesc(0)).findtext("description") or ""

    def state(self) -> str:
        """The guest state the snapshot recorded: running, paused, shutoff ..."""
        return ET.fromstring(self.native.getXMLDesc(0)).findtext("state") or "unknown"

    def identity(self) -> str:
        """Its name and creation time (seconds), which libvirt sets when it takes it."""
        return f"{self.name}@{ET.fromstring(self.native.getXMLDesc(0)).findtext('creationTime') or '?'}"


def native_snapshot(snapshot: Snapshot) -> libvirt.virDomainSnapshot:
    return cast(LibvirtSnapshot, snapshot).native


LOW_SPACE = 256 * 2**20  # bytes free below which a failed snapshot is blamed on the disk's file system


class DomainSnapshots:
    """The snapshots of the domain ``native``."""

    native: libvirt.virDomain

    def snapshot(self, name: str) -> Snapshot:
        """The snapshot called ``name``; if there is none, an error that lists the guest's snapshots."""
        snap = self.find_snapshot(name)
        if snap is None:
            domain = self.native.name()
            raise SnapshotNotFound(name, domain, self.native.snapshotListNames(), VirshAdvice().save_state(domain))
        return snap

    def find_snapshot(self, name: str) -> Snapshot | None:
        """The snapshot called ``name``, or None (no listing of the user's snapshots)."""
        snap = unless_missing(lambda: self.native.snapshotLookupByName(name), lib().VIR_ERR_NO_DOMAIN_SNAPSHOT)
        return None if snap is None else LibvirtSnapshot(snap)

    def snapshots(self) -> list[Snapshot]:
        return [LibvirtSnapshot(snap) for snap in self.native.listAllSnapshots()]

    def take_baseline(self, name: str, owner: Owner) -> Snapshot:
        """Take an internal snapshot: memory and disks when running, disks when off."""
        dom = self.native
        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "description").text = owner_description(owner)
        xml = ET.tostring(root, encoding="unicode")
        libvirt = lib()
        try:
            return LibvirtSnapshot(dom.snapshotCreateXML(xml, 0))
        except libvirt.libvirtError as exc:
            if is_lost_connection(exc):
                raise lost(dom.connect().getURI(), f"taking the baseline snapshot of {dom.name()!r}", exc) from None
            # The qcow2/pflash advice is for libvirt's refusals of internal
            # snapshots, not for every failure (a busy or lost daemon is not one).
            if exc.get_error_code() in (libvirt.VIR_ERR_OPERATION_UNSUPPORTED, libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
                                        libvirt.VIR_ERR_NO_SUPPORT):
                raise UnsupportedGuest(
                    f"cannot take a baseline snapshot of {dom.name()!r}: {exc}. "
                    "pytest-kvmsnap needs internal snapshots: qcow2 disks, and no pflash firmware "
                    "on libvirt older than 10.10."
                ) from None
            raise KvmSnapError(f"cannot take a baseline snapshot of {dom.name()!r}: {exc}{self._space_hint()}") \
                from None

    def _space_hint(self) -> str:
        """Which disk's file system is (nearly) full, when one is: the snapshot goes into its image."""
        hints = []
        for disk in writable_disks(ET.fromstring(self.native.XMLDesc(0))):
            source, target = disk.find("source"), disk.find("target")
            path = source.get("file") if source is not None else None
            if not path or not is_this_host(self.native.connect()):
                continue
            try:
                free = shutil.disk_usage(os.path.dirname(path)).free
            except OSError:
                continue
            if free < LOW_SPACE:
                hints.append(f"disk {target.get('dev') if target is not None else '?'} ({path}) is on a file "
                             f"system with {free / 2**20:.0f} MiB free, and the snapshot stores the guest's "
                             "memory in that image: free space there")
        return "; " + "; ".join(hints) if hints else ""

    def resume_if_paused_by_snapshot(self) -> None:
        """Resume a guest libvirt paused for a snapshot job that was cut off mid-way."""
        libvirt = lib()
        state, reason = self.native.state()
        if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT:
            self.native.resume()

    def holds_memory(self, snapshot: str) -> bool:
        """Does the running QEMU list internal snapshot ``snapshot`` with saved VM state?

        libvirt lists a snapshot from its own metadata; this asks QEMU itself, so
        a snapshot whose savevm was cut short is not mistaken for a complete one.
        """
        if not self.native.connect().getType().upper().startswith("QEMU"):
            return True  # no monitor to ask: libvirt's listing is all there is
        for line in hmp(self.native, "info snapshots").splitlines():
            fields = line.split()
            # ID TAG VM-SIZE UNIT DATE TIME VM-CLOCK [ICOUNT]; a disk-only one has VM SIZE 0 B.
            if len(fields) >= 4 and fields[1] == snapshot:
                return fields[2] not in ("0", "0.0")
        return False

    def revert_cold(self, snapshot: Snapshot) -> None:
        """libvirt's revert: a new QEMU process, started from the snapshot."""
        dom, snap = self.native, native_snapshot(snapshot)
        try:
            dom.revertToSnapshot(snap, 0)
        except lib().libvirtError as exc:
            if is_lost_connection(exc):
                raise lost(dom.connect().getURI(), f"reverting {dom.name()!r} to {snap.getName()!r}", exc) from None
            raise RevertFailed(f"reverting {dom.name()!r} to {snap.getName()!r} failed: {exc}") from None

    def delete_snapshot(self, snapshot: Snapshot) -> None:
        native_snapshot(snapshot).delete(0)

    def save_state(self, name: str, description: str) -> None:
        """Save the guest's state now (memory too while it runs) as snapshot ``name``, with the kept mark
        ``description`` (ownership.kept_description)."""
        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "description").text = description
        self.native.snapshotCreateXML(ET.tostring(root, encoding="unicode"), 0)

    def redescribe(self, snapshot: Snapshot, description: str) -> None:
        """Replace the snapshot's description in place (libvirt's redefine): how a baseline the user
        asked to keep (``--kvm-keep-snapshot``) gets the kept mark, so that no later run takes it for
        a dead run's orphan and reverts to it or deletes it."""
        snap = native_snapshot(snapshot)
        root = ET.fromstring(snap.getXMLDesc(0))
        element = root.find("description")
        if element is None:
            element = ET.SubElement(root, "description")
        element.text = description
        snap.getDomain().snapshotCreateXML(ET.tostring(root, encoding="unicode"),
                                           lib().VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
