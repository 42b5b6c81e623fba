"""The QEMU process behind a guest: who it is, whether it died, its monitor, and the reverts
(in place with ``loadvm``, or libvirt's, which starts a new process).

:class:`QemuProcess` is that part of a :class:`~pytest_kvmsnap.libvirt.machine.LibvirtMachine`;
:func:`hmp`, the monitor, is shared with the modules that need QEMU's own answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from pytest_kvmsnap.exceptions import (
    KvmSnapError,
    RevertFailed,
)
from pytest_kvmsnap.libvirt.connection import is_lost_connection, lib, lost

if TYPE_CHECKING:
    import libvirt

# QEMU's HMP parser treats quotes and spaces specially; only plain tags go there.
HMP_SAFE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


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


def hmp(dom: libvirt.virDomain, command_line: str) -> str:
    """A human-monitor command through libvirt's QEMU monitor passthrough; its text reply.

    Callers pass only fixed commands or names that passed ``HMP_SAFE``.
    """
    import libvirt_qemu

    command = json.dumps({"execute": "human-monitor-command", "arguments": {"command-line": command_line}})
    reply: dict[str, Any] = json.loads(libvirt_qemu.qemuMonitorCommand(dom, command, 0))
    if "error" in reply:
        raise KvmSnapError(f"QEMU refused {command_line.split()[0]!r}: {reply['error']}")
    return str(reply.get("return", ""))


class QemuProcess:
    """The QEMU process behind the domain ``native``."""

    native: libvirt.virDomain

    def process_identity(self) -> tuple[int, str] | None:
        """Which QEMU process runs the guest now: (libvirt domain id, device-XML hash).

        The id changes whenever libvirt starts a new QEMU; the hash changes on hotplug.
        An in-place ``loadvm`` is only safe into the same process with the same devices.
        """
        # A virDomain object caches the id it was looked up with; look up afresh.
        dom = self.native.connect().lookupByUUID(self.native.UUID())
        if not dom.isActive():
            return None
        return dom.ID(), device_hash(ET.fromstring(dom.XMLDesc(0)))

    def is_running(self) -> bool:
        return bool(self.native.isActive())

    def crash_reason(self) -> str | None:
        """Why the guest is down if QEMU died under it (not a shutdown or destroy asked for)."""
        libvirt = lib()
        state, reason = self.native.state()
        if state == libvirt.VIR_DOMAIN_CRASHED:
            return "the guest crashed"
        if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
            return "its QEMU process exited unexpectedly (killed or crashed)"
        return None

    def wait_until_down(self, seconds: float) -> bool:
        """Did the guest's QEMU go away (within ``seconds``)?  False while it keeps running."""
        deadline = time.monotonic() + seconds
        while True:
            with contextlib.suppress(lib().libvirtError):
                if not self.native.isActive() or self.crash_reason():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def hot_revert_problem(self, snapshot: str) -> str | None:
        """Why an in-place ``loadvm`` cannot be used, or None when it can."""
        conn = self.native.connect()
        if not conn.getType().upper().startswith("QEMU"):
            return f"the {conn.getType()} driver has no QEMU monitor"
        if not HMP_SAFE.match(snapshot):
            return f"snapshot name {snapshot!r} has characters QEMU's monitor would parse"
        try:
            import libvirt_qemu  # noqa: F401  (shipped with libvirt-python)
        except ImportError:
            return "libvirt_qemu is not importable"
        return None

    def revert_hot(self, snapshot: str) -> None:
        """``loadvm`` in the running QEMU process, then check that the guest runs."""
        libvirt = lib()
        try:
            # HMP reports errors as text in a successful QMP reply.
            text = hmp(self.native, f"loadvm {snapshot}").strip()
        except libvirt.libvirtError as exc:
            if is_lost_connection(exc):
                raise lost(self.native.connect().getURI(), f"loading {snapshot!r} in place", exc) from None
            raise RevertFailed(f"in-place loadvm of {snapshot!r} failed: {exc}") from None
        except KvmSnapError as exc:
            raise RevertFailed(f"in-place loadvm of {snapshot!r} failed: {exc}") from None
        if text:
            raise RevertFailed(f"in-place loadvm of {snapshot!r} failed: {text}")
        state, _reason = self.native.state()
        if state != libvirt.VIR_DOMAIN_RUNNING:
            raise RevertFailed(f"after in-place loadvm of {snapshot!r} the guest is not running (state {state})")
