"""Everything pytest-kvmsnap asks of libvirt, through libvirt's Python API only.

``libvirt`` is imported lazily so that ``pytest --help`` and suites that never
use a guest work on machines without libvirt.  Names (domains, snapshots) are
data: they reach libvirt as API arguments or as escaped XML text, and reach
QEMU's monitor only after a strict character check.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pytest_kvmsnap.exceptions import (
    ConnectionFailed,
    ConnectionLost,
    DomainNotFound,
    KvmSnapError,
    RevertFailed,
    SnapshotNotFound,
    UnsupportedGuest,
)
from pytest_kvmsnap.ownership import Owner, owner_description

if TYPE_CHECKING:
    import libvirt

# QEMU's HMP parser treats quotes and spaces specially; only plain tags go there.
_HMP_SAFE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
T = TypeVar("T")
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


def unless_missing(call: Callable[[], T], missing: int) -> T | None:
    """``call()``, or None when libvirt answers that what it asks for is not there (error
    code ``missing``: no such domain, snapshot ...); every other refusal is raised."""
    libvirt = lib()
    try:
        return call()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != missing:
            raise
        return None


def is_alive(conn: libvirt.virConnect) -> bool:
    """One cheap round trip to the daemon: False once the connection is gone."""
    try:
        conn.getLibVersion()
        return bool(conn.isAlive())
    except lib().libvirtError:
        return False


def is_this_host(conn: libvirt.virConnect) -> bool:
    """Does the hypervisor run on this host (so its files and 127.0.0.1 are ours)?"""
    return bool(conn.getHostname() == socket.gethostname())


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


# --- kept for the user: a failed test's state, and what it showed -----------------

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


def console_log(dom: libvirt.virDomain) -> str | None:
    """The file the guest's first serial console is written to, if it has one:
    a ``<serial type='file'>`` or any serial with a ``<log file=...>``."""
    root = ET.fromstring(dom.XMLDesc(0))
    for serial in [*root.iterfind("devices/serial"), *root.iterfind("devices/console")]:
        log = serial.find("log")
        if log is not None and log.get("file"):
            return log.get("file")
        source = serial.find("source")
        if serial.get("type") == "file" and source is not None and source.get("path"):
            return source.get("path")
    return None


def has_screen(dom: libvirt.virDomain) -> bool:
    """Does the guest have a video device (what libvirt takes a screenshot of)?"""
    root = ET.fromstring(dom.XMLDesc(0))
    return any(model.get("type") != "none" for model in root.iterfind("devices/video/model"))


def screenshot(dom: libvirt.virDomain) -> tuple[str, bytes]:
    """The guest's first screen and its MIME type (PNG where QEMU can, else PPM), through a
    libvirt stream (so it works remotely too)."""
    stream = dom.connect().newStream(0)
    try:
        mime = str(dom.screenshot(stream, 0, 0))
        chunks = []
        while chunk := stream.recv(1 << 18):
            if not isinstance(chunk, bytes):  # -2: would block; not on a blocking stream
                break
            chunks.append(chunk)
        stream.finish()
    except BaseException:
        with contextlib.suppress(Exception):
            stream.abort()
        raise
    return mime, b"".join(chunks)


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
    return dom.ID(), device_hash(ET.fromstring(dom.XMLDesc(0)))


def device_hash(root: ET.Element) -> str:
    """A hash of the domain's devices as configured, not as they are at this moment.

    A channel's ``state`` (the guest agent connected or not) changes under a
    running guest, with every revert and boot, and is no hotplug: a hash over it
    made the first revert of a freshly started clone fall back to libvirt's
    whenever its agent connected after the clone started.
    """
    devices = root.find("devices")
    if devices is None:
        return hashlib.sha256(b"").hexdigest()
    for target in devices.iterfind("channel/target"):
        target.attrib.pop("state", None)
    return hashlib.sha256(ET.tostring(devices, encoding="unicode").encode()).hexdigest()


def crash_reason(dom: libvirt.virDomain) -> str | None:
    """Why the guest is down if QEMU died under it (not a shutdown or destroy asked for)."""
    libvirt = lib()
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return "the guest crashed"
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
        return "its QEMU process exited unexpectedly (killed or crashed)"
    return None


def wait_until_down(dom: libvirt.virDomain, seconds: float) -> bool:
    """Did the guest's QEMU go away (within ``seconds``)?  False while it keeps running."""
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(lib().libvirtError):
            if not dom.isActive() or crash_reason(dom):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


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


def hmp(dom: libvirt.virDomain, command_line: str) -> str:
    """A human-monitor command through libvirt's QEMU monitor passthrough; its text reply.

    Callers pass only fixed commands or names that passed ``_HMP_SAFE``.
    """
    import libvirt_qemu

    command = json.dumps({"execute": "human-monitor-command", "arguments": {"command-line": command_line}})
    reply: dict[str, Any] = json.loads(libvirt_qemu.qemuMonitorCommand(dom, command, 0))
    if "error" in reply:
        raise KvmSnapError(f"QEMU refused {command_line.split()[0]!r}: {reply['error']}")
    return str(reply.get("return", ""))


def revert_inplace(dom: libvirt.virDomain, snapshot: str) -> None:
    """``loadvm`` in the running QEMU process, then check that the guest runs."""
    libvirt = lib()
    try:
        # HMP reports errors as text in a successful QMP reply.
        text = hmp(dom, f"loadvm {snapshot}").strip()
    except libvirt.libvirtError as exc:
        if is_lost_connection(exc):
            raise ConnectionLost(dom.connect().getURI(), f"loading {snapshot!r} in place", str(exc)) from None
        raise RevertFailed(f"in-place loadvm of {snapshot!r} failed: {exc}") from None
    except KvmSnapError as exc:
        raise RevertFailed(f"in-place loadvm of {snapshot!r} failed: {exc}") from None
    if text:
        raise RevertFailed(f"in-place loadvm of {snapshot!r} failed: {text}")
    state, _reason = dom.state()
    if state != libvirt.VIR_DOMAIN_RUNNING:
        raise RevertFailed(f"after in-place loadvm of {snapshot!r} the guest is not running (state {state})")


# --- the guest agent and the guest's network ----------------------------------

AGENT_CHANNEL = "org.qemu.guest_agent.0"
# Forces the guest kernel to mix in fresh bytes and reseed its random generator.
# ioctl numbers from linux/random.h: RNDADDENTROPY = _IOW('R', 3, int[2]), RNDRESEEDCRNG = _IO('R', 7).
_RESEED_PERL = ('open(my $f, ">", "/dev/urandom") or die "open: $!"; my $d = pack("H*", $ARGV[0]); '
                'ioctl($f, 0x40085203, pack("ii", 8 * length($d), length($d)) . $d) or die "RNDADDENTROPY: $!"; '
                'ioctl($f, 0x5207, 0) or die "RNDRESEEDCRNG: $!";')


def has_agent_channel(dom: libvirt.virDomain) -> bool:
    """Does the guest have libvirt's QEMU guest agent channel?"""
    root = ET.fromstring(dom.XMLDesc(0))
    return any(target.get("name") == AGENT_CHANNEL for target in root.iterfind("devices/channel/target"))


def agent_command(dom: libvirt.virDomain, command: str, arguments: dict[str, Any] | None = None,
                  timeout: int = 5) -> Any:
    """One guest agent command; its ``return`` value.  Raises libvirtError when it does not answer."""
    import libvirt_qemu

    message: dict[str, Any] = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(message), timeout, 0)).get("return")


def is_agent_unavailable(exc: Exception) -> bool:
    """The agent is not (yet) there: after a revert its channel reconnects, and libvirt says
    "not connected" or "not synced" for a second or two, sometimes after a first answer."""
    libvirt = lib()
    return isinstance(exc, libvirt.libvirtError) and exc.get_error_code() in (
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED)


def agent_answers(dom: libvirt.virDomain, timeout: int = 2) -> bool:
    try:
        agent_command(dom, "guest-ping", timeout=timeout)
        return True
    except lib().libvirtError:
        return False


def sync_clock(dom: libvirt.virDomain) -> None:
    """Set the guest's clock from the host's, then reset QEMU's RTC reinjection so it does
    not replay the ticks the restored guest "missed" (as QEMU's own loadvm test does).

    ``date -s`` through the agent, where the guest has it: the agent's own
    guest-set-time (libvirt's ``setTime``, what Nova uses, and the fallback here)
    also runs ``hwclock -w``, which waits for the next second boundary, 0.5-2.7 s
    under TCG, measured.
    """
    import libvirt_qemu

    try:
        code, _err = agent_exec(dom, "/bin/date", ["-u", "-s", f"@{time.time():.6f}"])
    except lib().libvirtError as exc:
        if is_agent_unavailable(exc):
            raise
        code = -1  # no /bin/date in this guest
    if code != 0:
        now = time.time()
        dom.setTime({"seconds": int(now), "nseconds": int(now % 1 * 1e9)}, 0)
    with contextlib.suppress(lib().libvirtError):  # machines without an x86 RTC lack the command
        libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": "rtc-reset-reinjection"}), 0)


def agent_exec(dom: libvirt.virDomain, path: str, args: list[str], timeout: float = 30.0) -> tuple[int, str]:
    """Run a program in the guest through the agent; its exit code and stderr."""
    pid = agent_command(dom, "guest-exec", {"path": path, "arg": args, "capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = agent_command(dom, "guest-exec-status", {"pid": pid})
        if status.get("exited"):
            err = base64.b64decode(status.get("err-data", "")).decode(errors="replace").strip()
            return int(status.get("exitcode", -1)), err
        time.sleep(0.02)
    raise KvmSnapError(f"{path} did not finish in the guest within {timeout:.0f} s")


def reseed(dom: libvirt.virDomain) -> str | None:
    """Mix 64 fresh host bytes into the guest's pool and force a reseed; None, or why not fully."""
    entropy = os.urandom(64)
    try:
        code, err = agent_exec(dom, "/usr/bin/perl", ["-e", _RESEED_PERL, entropy.hex()])
        if code == 0:
            return None
        why = f"the reseed helper failed: {err}"
    except lib().libvirtError as exc:
        if is_agent_unavailable(exc):
            raise  # not the guest's lack of perl: the caller waits for the agent and tries again
        why = f"no perl in the guest to force a reseed ({exc})"
    # Writing still mixes the bytes into the pool, without a forced reseed.
    handle = agent_command(dom, "guest-file-open", {"path": "/dev/urandom", "mode": "w"})
    try:
        agent_command(dom, "guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(entropy).decode()})
    finally:
        agent_command(dom, "guest-file-close", {"handle": handle})
    return why + "; fresh bytes were mixed in without it"


def user_netdev(dom: libvirt.virDomain) -> str | None:
    """QEMU's id for the guest's first user-mode (SLIRP) network backend, if it has one.

    From libvirt's ``<interface type='user'>``, else from QEMU itself: many
    guests get their user-mode network from ``<qemu:commandline>``
    (``-netdev user,id=n0,hostfwd=...``), which libvirt knows nothing of.
    """
    root = ET.fromstring(dom.XMLDesc(0))
    for interface in root.iterfind("devices/interface"):
        alias = interface.find("alias")
        if interface.get("type") == "user" and alias is not None and alias.get("name"):
            return f"host{alias.get('name')}"  # libvirt names the backend of device netN hostnetN
    if root.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline") is None or not dom.isActive():
        return None  # libvirt made every netdev: it listed them above
    netdevs, _forwards = parse_usernet(hmp(dom, "info usernet"))
    return next((netdev for netdev in netdevs if _HMP_SAFE.match(netdev)), None)


# ``info usernet``: a header per user-mode network, and a line per connection or forward.
_USERNET_HUB = re.compile(r"^Hub -?\d+ \(([^)]+)\):", re.MULTILINE)
_USERNET_FORWARD = re.compile(r"^\s*TCP\[HOST_FORWARD\]\s+\d+\s+(\S+)\s+(\d+)\s+\S+\s+(\d+)\b", re.MULTILINE)


def parse_usernet(text: str) -> tuple[list[str], dict[int, tuple[str, int]]]:
    """QEMU's ``info usernet``: the user-mode networks' netdev ids, and guest TCP port -> (host
    address, host port) of each forward.  An unspecified host address is any: 127.0.0.1 reaches it."""
    forwards: dict[int, tuple[str, int]] = {}
    for host, host_port, guest_port in _USERNET_FORWARD.findall(text):
        address = "127.0.0.1" if host in ("*", "0.0.0.0") else host
        forwards.setdefault(int(guest_port), (address, int(host_port)))
    return _USERNET_HUB.findall(text), forwards


def host_forwards(dom: libvirt.virDomain) -> dict[int, tuple[str, int]]:
    """Guest TCP port -> (host address, host port) of every forward QEMU has now, whoever made it
    (``<qemu:commandline>`` hostfwd, libvirt, this plugin)."""
    return parse_usernet(hmp(dom, "info usernet"))[1]


def forward_port(dom: libvirt.virDomain, netdev: str, guest_port: int) -> int:
    """Forward a free port on the host's 127.0.0.1 to ``guest_port``; the host port."""
    for _ in range(5):  # a port found free may be taken before QEMU binds it
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        reply = hmp(dom, f"hostfwd_add {netdev} tcp:127.0.0.1:{port}-:{int(guest_port)}").strip()
        if not reply:
            return port
    raise KvmSnapError(f"QEMU could not forward a host port to {dom.name()!r}'s port {guest_port}: {reply}")


def guest_ipv4(dom: libvirt.virDomain) -> str | None:
    """The guest's IPv4 address: from libvirt's DHCP leases, else the agent, else the ARP table."""
    libvirt = lib()
    for source in (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
                   libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP):
        try:
            interfaces = dom.interfaceAddresses(source, 0) or {}
        except libvirt.libvirtError:
            continue
        for info in interfaces.values():
            for address in info.get("addrs") or []:
                if address.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4 and not address["addr"].startswith("127."):
                    return str(address["addr"])
    return None
