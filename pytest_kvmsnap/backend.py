"""Everything pytest-kvmsnap asks of libvirt, through libvirt's Python API only.

``libvirt`` is imported lazily so that ``pytest --help`` and suites that never
use a guest work on machines without libvirt.  Names (domains, snapshots) are
data: they reach libvirt as API arguments or as escaped XML text, and reach
QEMU's monitor only after a strict character check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from pytest_kvmsnap.exceptions import (
    ConnectionFailed,
    ConnectionLost,
    DomainNotFound,
    KvmSnapError,
    RevertFailed,
    SnapshotNotFound,
    UnsupportedGuest,
)

if TYPE_CHECKING:
    import libvirt

OWNER = "pytest-kvmsnap"
PREFIX = "kvmsnap-"
_DESCRIPTION_TAG = "pytest-kvmsnap baseline "
# QEMU's HMP parser treats quotes and spaces specially; only plain tags go there.
_HMP_SAFE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
# libvirt 10.10 was the first to take, revert and delete internal snapshots of
# guests whose firmware is in pflash (with qcow2 NVRAM).
PFLASH_MIN_VERSION = 10_010_000


def lib() -> ModuleType:
    """Import libvirt on first use and stop it printing errors we report ourselves."""
    try:
        import libvirt
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ConnectionFailed(
            "the libvirt Python bindings are not installed: pip install libvirt-python "
            "(it builds against libvirt-dev and pkg-config)"
        ) from exc
    libvirt.registerErrorHandler(_ignore_error, None)
    return cast(ModuleType, libvirt)


def _ignore_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours carry it instead."""


def open_connection(uri: str) -> libvirt.virConnect:
    libvirt = lib()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ConnectionFailed.from_libvirt(uri, str(exc)) from None


def is_lost_connection(exc: Exception) -> bool:
    """Did this libvirt error come from the connection dropping, not from the request?

    Every RPC-layer error means that ("End of file while reading data", "client
    socket is closed", "Cannot write data"); so does using a closed connection.
    """
    libvirt = lib()
    if not isinstance(exc, libvirt.libvirtError):
        return False
    return bool(exc.get_error_domain() == libvirt.VIR_FROM_RPC
                or exc.get_error_code() in (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_NO_CONNECT))


@contextlib.contextmanager
def libvirt_errors(uri: str, action: str) -> Iterator[None]:
    """Turn libvirt's exceptions inside into the plugin's one-line errors.

    A dropped connection becomes :class:`ConnectionLost` (the caller may
    reconnect and retry); any other refusal names the step that failed.
    """
    libvirt = lib()
    try:
        yield
    except libvirt.libvirtError as exc:
        if is_lost_connection(exc):
            raise ConnectionLost(uri, action, str(exc)) from None
        raise KvmSnapError(f"libvirt failed while {action}: {exc}") from None


def is_alive(conn: libvirt.virConnect) -> bool:
    """One cheap round trip to the daemon: False once the connection is gone."""
    try:
        conn.getLibVersion()
        return bool(conn.isAlive())
    except lib().libvirtError:
        return False


def lookup_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    libvirt = lib()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        existing = [d.name() for d in conn.listAllDomains()]
        raise DomainNotFound(name, conn.getURI(), existing) from None


def lookup_snapshot(dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot:
    """The snapshot called ``name``; if there is none, an error that lists the guest's snapshots."""
    snap = find_snapshot(dom, name)
    if snap is None:
        raise SnapshotNotFound(name, dom.name(), dom.snapshotListNames())
    return snap


# --- ownership -------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The record every snapshot the plugin creates carries in its description."""

    run_id: str
    pid: int
    host: str
    started: float

    def to_json(self) -> str:
        return json.dumps({"owner": OWNER, "run": self.run_id, "pid": self.pid,
                           "host": self.host, "started": self.started})

    @classmethod
    def from_description(cls, text: str | None) -> Owner | None:
        if not text or not text.startswith(_DESCRIPTION_TAG):
            return None
        return cls.from_json(text[len(_DESCRIPTION_TAG):])

    @classmethod
    def from_json(cls, text: str) -> Owner | None:
        try:
            data = json.loads(text)
            if data.get("owner") != OWNER:
                return None
            return cls(str(data["run"]), int(data["pid"]), str(data["host"]),
                       float(data["started"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def owner_description(owner: Owner) -> str:
    """The text that marks a snapshot or clone domain as this plugin's."""
    return _DESCRIPTION_TAG + owner.to_json()


def snapshot_owner(snap: libvirt.virDomainSnapshot) -> Owner | None:
    """Who created ``snap``: an :class:`Owner` for ours, None for the user's."""
    root = ET.fromstring(snap.getXMLDesc(0))
    return Owner.from_description(root.findtext("description"))


def owned_snapshots(dom: libvirt.virDomain) -> list[tuple[Owner, libvirt.virDomainSnapshot]]:
    """The guest's snapshots this plugin created (any run), with their owners."""
    pairs = ((snapshot_owner(snap), snap) for snap in dom.listAllSnapshots())
    return [(owner, snap) for owner, snap in pairs if owner is not None]


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
        raise KvmSnapError(f"cannot take a baseline snapshot of {dom.name()!r}: {exc}") from None


def find_snapshot(dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot | None:
    """The snapshot called ``name``, or None (no listing of the user's snapshots)."""
    libvirt = lib()
    try:
        return dom.snapshotLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            raise
        return None


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
    import libvirt_qemu

    command = json.dumps({"execute": "human-monitor-command", "arguments": {"command-line": "info snapshots"}})
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, command, 0))
    for line in str(reply.get("return", "")).splitlines():
        fields = line.split()
        # ID TAG VM-SIZE UNIT DATE TIME VM-CLOCK [ICOUNT]; a disk-only one has VM SIZE 0 B.
        if len(fields) >= 4 and fields[1] == name:
            return fields[2] not in ("0", "0.0")
    return False


def delete_snapshot(snap: libvirt.virDomainSnapshot) -> None:
    snap.delete(0)


# --- preflight ---------------------------------------------------------------


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


# --- reverting ---------------------------------------------------------------


def process_identity(dom: libvirt.virDomain) -> tuple[int, str] | None:
    """Which QEMU process runs the guest now: (libvirt domain id, device-XML hash).

    The id changes whenever libvirt starts a new QEMU; the hash changes on hotplug.
    An in-place ``loadvm`` is only safe into the same process with the same devices.
    """
    # A virDomain object caches the id it was looked up with; look up afresh.
    dom = dom.connect().lookupByUUID(dom.UUID())
    if not dom.isActive():
        return None
    devices = ET.fromstring(dom.XMLDesc(0)).find("devices")
    text = ET.tostring(devices, encoding="unicode") if devices is not None else ""
    return dom.ID(), hashlib.sha256(text.encode()).hexdigest()


def crash_reason(dom: libvirt.virDomain) -> str | None:
    """Why the guest is down if QEMU died under it (not a shutdown or destroy asked for)."""
    libvirt = lib()
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return "the guest crashed"
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
        return "its QEMU process exited unexpectedly (killed or crashed)"
    return None


def revert_libvirt(dom: libvirt.virDomain, snap: libvirt.virDomainSnapshot) -> None:
    libvirt = lib()
    try:
        dom.revertToSnapshot(snap, 0)
    except libvirt.libvirtError as exc:
        if is_lost_connection(exc):
            raise ConnectionLost(dom.connect().getURI(), f"reverting {dom.name()!r} to {snap.getName()!r}",
                                 str(exc)) from None
        raise RevertFailed(f"reverting {dom.name()!r} to {snap.getName()!r} failed: {exc}") from None


def inplace_possible(conn: libvirt.virConnect, snapshot: str) -> str | None:
    """Why an in-place ``loadvm`` cannot be used, or None when it can."""
    if not conn.getType().upper().startswith("QEMU"):
        return f"the {conn.getType()} driver has no QEMU monitor"
    if not _HMP_SAFE.match(snapshot):
        return f"snapshot name {snapshot!r} has characters QEMU's monitor would parse"
    try:
        import libvirt_qemu  # noqa: F401  (shipped with libvirt-python)
    except ImportError:
        return "libvirt_qemu is not importable"
    return None


def revert_inplace(dom: libvirt.virDomain, snapshot: str) -> None:
    """``loadvm`` in the running QEMU process, then check that the guest runs."""
    import libvirt_qemu

    libvirt = lib()
    command = json.dumps({"execute": "human-monitor-command",
                          "arguments": {"command-line": f"loadvm {snapshot}"}})
    try:
        reply: dict[str, Any] = json.loads(libvirt_qemu.qemuMonitorCommand(dom, command, 0))
    except libvirt.libvirtError as exc:
        if is_lost_connection(exc):
            raise ConnectionLost(dom.connect().getURI(), f"loading {snapshot!r} in place", str(exc)) from None
        raise RevertFailed(f"in-place loadvm of {snapshot!r} failed: {exc}") from None
    # HMP reports errors as text in a successful QMP reply.
    text = str(reply.get("return", "")).strip()
    if "error" in reply or text:
        raise RevertFailed(f"in-place loadvm of {snapshot!r} failed: {reply.get('error') or text}")
    state, _reason = dom.state()
    if state != libvirt.VIR_DOMAIN_RUNNING:
        raise RevertFailed(f"after in-place loadvm of {snapshot!r} the guest is not running (state {state})")
