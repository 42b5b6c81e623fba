"""The guest agent: whether it answers, the clock, entropy, and running a helper in the guest.

:class:`GuestAgent` is that part of a :class:`~pytest_kvmsnap.libvirt.machine.LibvirtMachine`;
:func:`agent_exec` also serves the project's test guests (``testing/``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.guestside import NO_PERL, RESEED_PERL, partial, settle_perl, settle_script
from pytest_kvmsnap.libvirt.connection import lib

if TYPE_CHECKING:
    import libvirt


AGENT_CHANNEL = "org.qemu.guest_agent.0"


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


def agent_exec(dom: libvirt.virDomain, path: str, args: list[str], timeout: float = 30.0) -> tuple[int, str]:
    """Run a program in the guest through the agent; its exit code and stderr."""
    code, _out, err = agent_run(dom, path, args, timeout=timeout)
    return code, err


def agent_run(dom: libvirt.virDomain, path: str, args: list[str], stdin: str | None = None,
              timeout: float = 30.0) -> tuple[int, str, str]:
    """Run a program in the guest through the agent, ``stdin`` as its input: exit code, stdout, stderr."""
    arguments: dict[str, Any] = {"path": path, "arg": args, "capture-output": True}
    if stdin is not None:
        arguments["input-data"] = base64.b64encode(stdin.encode()).decode()
    pid = agent_command(dom, "guest-exec", arguments)["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = agent_command(dom, "guest-exec-status", {"pid": pid})
        if status.get("exited"):
            out, err = (base64.b64decode(status.get(key, "")).decode(errors="replace") for key in ("out-data",
                                                                                                  "err-data"))
            return int(status.get("exitcode", -1)), out, err.strip()
        time.sleep(0.02)
    raise KvmSnapError(f"{path} did not finish in the guest within {timeout:.0f} s")


class GuestAgent:
    """The guest agent of the domain ``native``."""

    native: libvirt.virDomain

    def has_agent(self) -> bool:
        """Does the guest have libvirt's QEMU guest agent channel?"""
        root = ET.fromstring(self.native.XMLDesc(0))
        return any(target.get("name") == AGENT_CHANNEL for target in root.iterfind("devices/channel/target"))

    def agent_answers(self, timeout: int = 2) -> bool:
        try:
            agent_command(self.native, "guest-ping", timeout=timeout)
            return True
        except lib().libvirtError:
            return False

    def refresh(self, clock: bool, reseed: bool) -> str | None:
        """Clock and entropy in one guest process, perl, else a shell script (guestside.py); step
        by step where the guest has neither or the one process failed.  None, or why the reseed was only partial."""
        if not (clock or reseed):
            return None
        code, err = self._settle_exec("/usr/bin/perl", ["-e", settle_perl(clock, reseed)])
        if code == -1:  # no perl there: the shell script
            code, err = self._settle_exec("/bin/sh", ["-c", settle_script(clock, reseed), "sh"])
        if code in (0, NO_PERL):
            if clock:
                self.clock_set()
            return None if code == 0 else partial(code, err)
        if clock:
            self.sync_clock()
        return self.reseed() if reseed else None

    def _settle_exec(self, path: str, args: list[str]) -> tuple[int, str]:
        """Run a settle program with the host's time and fresh bytes; -1 when the guest has no ``path``."""
        try:
            return agent_exec(self.native, path, [*args, f"{time.time():.6f}", os.urandom(64).hex()])
        except lib().libvirtError as exc:
            if is_agent_unavailable(exc):
                raise  # the caller waits for the agent and tries again
            return -1, ""

    def run_program(self, path: str, args: list[str], stdin: str) -> tuple[int, str]:
        try:
            code, out, _err = agent_run(self.native, path, args, stdin)
        except lib().libvirtError as exc:
            raise KvmSnapError(f"running {path} through the guest agent: {exc.get_error_message()}") from None
        return code, out

    def clock_set(self) -> None:
        """The guest's clock was just set: reset QEMU's RTC reinjection, so that it does not replay
        the ticks the restored guest "missed" (as QEMU's own loadvm test does)."""
        import libvirt_qemu

        with contextlib.suppress(lib().libvirtError):  # machines without an x86 RTC lack the command
            libvirt_qemu.qemuMonitorCommand(self.native, json.dumps({"execute": "rtc-reset-reinjection"}), 0)

    def sync_clock(self) -> None:
        """Set the guest's clock from the host's, then reset QEMU's RTC reinjection so it does
        not replay the ticks the restored guest "missed" (as QEMU's own loadvm test does).

        ``date -s`` through the agent, where the guest has it: the agent's own
        guest-set-time (libvirt's ``setTime``, what Nova uses, and the fallback here)
        also runs ``hwclock -w``, which waits for the next second boundary, 0.5-2.7 s
        under TCG, measured.
        """
        try:
            code, _err = agent_exec(self.native, "/bin/date", ["-u", "-s", f"@{time.time():.6f}"])
        except lib().libvirtError as exc:
            if is_agent_unavailable(exc):
                raise
            code = -1  # no /bin/date in this guest
        if code != 0:
            now = time.time()
            self.native.setTime({"seconds": int(now), "nseconds": int(now % 1 * 1e9)}, 0)
        self.clock_set()

    def reseed(self) -> str | None:
        """Mix 64 fresh host bytes into the guest's pool and force a reseed; None, or why not fully."""
        entropy = os.urandom(64)
        try:
            code, err = agent_exec(self.native, "/usr/bin/perl", ["-e", RESEED_PERL, entropy.hex()])
            if code == 0:
                return None
            why = f"the reseed helper failed: {err}"
        except lib().libvirtError as exc:
            if is_agent_unavailable(exc):
                raise  # not the guest's lack of perl: the caller waits for the agent and tries again
            why = f"no perl in the guest to force a reseed ({exc})"
        # Writing still mixes the bytes into the pool, without a forced reseed.
        handle = agent_command(self.native, "guest-file-open", {"path": "/dev/urandom", "mode": "w"})
        try:
            agent_command(self.native, "guest-file-write",
                          {"handle": handle, "buf-b64": base64.b64encode(entropy).decode()})
        finally:
            agent_command(self.native, "guest-file-close", {"handle": handle})
        return why + "; fresh bytes were mixed in without it"
