"""Before a guest is touched: what would make its snapshots fail or lie.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from pytest_kvmsnap.exceptions import (
    UnsupportedGuest,
)

if TYPE_CHECKING:
    import libvirt

# libvirt 10.10 was the first to take, revert and delete internal snapshots of
# guests whose firmware is in pflash (with qcow2 NVRAM).
PFLASH_MIN_VERSION = 10_010_000


def preflight(conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
    """Refuse guests that would fail halfway through, with the reason and the fix."""
    root = ET.fromstring(dom.XMLDesc(0))
    for disk in writable_disks(root):
        _check_disk(dom.name(), disk)
    loader = root.find("os/loader")
    if loader is not None and loader.get("type") == "pflash":
        _check_pflash(conn, dom.name(), root)
    blocker = _savevm_blocker(root)
    if blocker:
        raise UnsupportedGuest(
            f"guest {dom.name()!r} has {blocker}, which QEMU cannot save into a snapshot "
            "(it blocks savevm and migration). Remove it from a copy of the guest used for tests."
        )


def _savevm_blocker(root: ET.Element) -> str | None:
    """A device or feature that always makes QEMU refuse to save the VM state."""
    for dev in root.iterfind("devices/hostdev"):
        if dev.get("type", "pci") in ("pci", "mdev"):
            return f"a passed-through host device (<hostdev type='{dev.get('type', 'pci')}'>)"
    for fs in root.iterfind("devices/filesystem"):
        driver = fs.find("driver")
        if driver is not None and driver.get("type") == "virtiofs":
            return "a virtiofs filesystem (<filesystem> with <driver type='virtiofs'>)"
    for shmem in root.iterfind("devices/shmem"):
        role = shmem.find("role")
        if role is None or role.text != "master":
            return f"shared memory {shmem.get('name')!r} without <role>master</role>"
    for feature in root.iterfind("cpu/feature"):
        if feature.get("name") == "invtsc" and feature.get("policy") in ("require", "force"):
            return "the invtsc CPU feature"
    return None


def writable_disks(root: ET.Element) -> list[ET.Element]:
    """The disks of a domain's XML that the guest writes to (what a snapshot must hold)."""
    return [disk for disk in root.iterfind("devices/disk")
            if disk.get("device", "disk") == "disk" and disk.find("readonly") is None]


def _check_disk(domain: str, disk: ET.Element) -> None:
    driver = disk.find("driver")
    fmt = (driver.get("type") if driver is not None else None) or "raw"
    if fmt != "qcow2":
        target = disk.find("target")
        dev = target.get("dev") if target is not None else "?"
        raise UnsupportedGuest(
            f"guest {domain!r}: disk {dev} is {fmt}, and internal snapshots need qcow2. "
            f"Convert it (qemu-img convert -O qcow2 OLD NEW) and point the disk at NEW, "
            f"or mark it <readonly/> if tests never write to it."
        )


def _check_pflash(conn: libvirt.virConnect, domain: str, root: ET.Element) -> None:
    version = conn.getLibVersion()
    nvram = root.find("os/nvram")
    qcow2_nvram = nvram is not None and nvram.get("format") == "qcow2"
    if version < PFLASH_MIN_VERSION or not qcow2_nvram:
        raise UnsupportedGuest(
            f"guest {domain!r} boots UEFI from pflash; libvirt {_version(version)} "
            + ("cannot snapshot such guests internally (10.10 or newer can, with qcow2 NVRAM)."
               if version < PFLASH_MIN_VERSION else "needs its NVRAM in qcow2 format "
               "(<nvram format='qcow2'>) to snapshot it internally.")
            + " Use a BIOS (SeaBIOS) guest, or upgrade libvirt."
        )


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
