"""When a test fails: its guests' state kept for the user, and what they showed.

Plain code, no pytest; the glue (``plugin.py``) asks for it when a report fails.

- **Keep**: before the failed test's guests are reverted, their state (memory
  and disk) is saved as a snapshot named from the test and marked *kept for
  the user* (``ownership.kept_description``), which no cleanup or recovery of the
  plugin ever touches.  At most ``kvm_keep_failed_max`` per guest and run.
- **Console**: what the guest wrote to its serial console's log file during
  the test, the last N lines, with a kernel panic, oops or hung task called out.
- **Screenshot**: a guest with a screen, as a PNG in the artifacts directory.
"""

from __future__ import annotations

import hashlib
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from pytest_kvmsnap.engine import Advice, Machine, kept_for_user
from pytest_kvmsnap.ownership import kept_description

# What a kernel says when the guest, not the test, went wrong; most serious first.
TROUBLE = tuple(re.compile(pattern) for pattern in (
    r"Kernel panic - not syncing.*",
    r"(?:Internal error: )?Oops\b.*",
    r"BUG: (?:kernel NULL pointer|unable to handle|soft lockup|scheduling while atomic).*",
    r"watchdog: BUG: .*",
    r"INFO: task .* blocked for more than \d+ seconds.*",
    r"general protection fault.*",
    r"Out of memory: Killed process.*",
))
CONSOLE_READ_LIMIT = 1 << 20  # bytes of a test's console read at most (its tail)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def find_trouble(text: str) -> str | None:
    """The line that says the guest's kernel got into trouble (the most serious kind), or None."""
    for pattern in TROUBLE:
        found = pattern.search(text)
        if found:
            return found.group(0).strip()
    return None


def kept_name(nodeid: str, run_id: str, number: int) -> str:
    """A kept snapshot's name: the test's, made safe for libvirt and QEMU's monitor
    (whose ``loadvm`` would parse quotes and spaces), and unique in the run."""
    test = _UNSAFE.sub("_", nodeid.rsplit("::", 1)[-1]).strip("_.-")[:60] or "test"
    return f"kept-{test}-{run_id}-{number}"


def file_stem(nodeid: str, guest: str) -> str:
    """An artifact's file name stem: the test id and guest, safe in any file system."""
    stem = _UNSAFE.sub("_", f"{nodeid}-{guest}").strip("_.-")
    if len(stem) > 150:  # long parametrized ids: keep them apart by a hash
        stem = f"{stem[:140]}-{hashlib.sha256(stem.encode()).hexdigest()[:8]}"
    return stem


def png_from_ppm(data: bytes) -> bytes:
    """QEMU's screendump in its old format (binary PPM, P6; QEMU before 7.1 or libvirt before
    8.1 send only that) as PNG, which any browser and CI shows."""
    fields: list[bytes] = []
    position = 0
    while len(fields) < 4:  # magic, width, height, maxval; '#' starts a comment
        match = re.compile(rb"\s*(#[^\n]*\n|\S+)").match(data, position)
        if match is None:
            raise ValueError("not a PPM image")
        position = match.end()
        if not match.group(1).startswith(b"#"):
            fields.append(match.group(1))
    if fields[0] != b"P6" or fields[3] != b"255":
        raise ValueError("not an 8-bit binary PPM image")
    width, height = int(fields[1]), int(fields[2])
    pixels = data[position + 1:position + 1 + 3 * width * height]
    rows = b"".join(b"\0" + pixels[y * 3 * width:(y + 1) * 3 * width] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# --- the console ---------------------------------------------------------------


@dataclass(frozen=True)
class ConsoleMark:
    """Where a guest's console log stood when a test started (or why it cannot be read)."""

    path: str | None
    offset: int = 0
    unavailable: str | None = None


@dataclass(frozen=True)
class ConsoleTail:
    guest: str
    lines: tuple[str, ...]  # the last N lines written during the test
    total: int  # how many lines it wrote in all
    trouble: str | None  # a kernel panic, oops or hung-task line among them
    unavailable: str | None = None  # why there is no console to show

    def text(self) -> str:
        if self.unavailable:
            return f"(no console: {self.unavailable})"
        if not self.total:
            return "(the guest wrote nothing to its console during the test)"
        cut = f"(last {len(self.lines)} of {self.total} lines)\n" if len(self.lines) < self.total else ""
        return cut + "\n".join(self.lines)


def console_mark(machine: Machine, local: bool) -> ConsoleMark:
    """Where the guest's console log ends now: a failed test's console starts there."""
    path = machine.console_log()
    if path is None:
        return ConsoleMark(None, unavailable="its serial console is not written to a file; give the "
                           "<serial> a <log file='...' append='on'/> (or make it type='file')")
    if not local:
        return ConsoleMark(path, unavailable=f"its console log {path} is on the hypervisor host, not this one")
    try:
        return ConsoleMark(path, Path(path).stat().st_size)
    except OSError as exc:
        return ConsoleMark(path, unavailable=f"cannot read its console log: {exc.strerror}: {path}")


def console_since(guest: str, mark: ConsoleMark, lines: int) -> ConsoleTail:
    """What the guest wrote after ``mark``: its last ``lines`` lines, and any kernel trouble."""
    if mark.path is None or mark.unavailable:
        return ConsoleTail(guest, (), 0, None, mark.unavailable)
    try:
        with open(mark.path, "rb") as log:
            size = log.seek(0, 2)
            # A QEMU restarted by a cold revert truncates a log without append='on'.
            start = mark.offset if size >= mark.offset else 0
            log.seek(max(start, size - CONSOLE_READ_LIMIT))
            raw = log.read()
    except OSError as exc:
        return ConsoleTail(guest, (), 0, None, f"cannot read its console log: {exc.strerror}: {mark.path}")
    text = raw.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    written = [line for line in text.split("\n") if line.strip()]
    return ConsoleTail(guest, tuple(written[-lines:]) if lines else (), len(written), find_trouble(text))


# --- keeping a failed state ------------------------------------------------------


@dataclass(frozen=True)
class Kept:
    guest: str  # where to look: the guest, or the domain a clone is kept as after the run
    test: str
    snapshot: str | None  # None: not kept, see why_not
    why_not: str | None = None
    pool: str = ""  # a kept clone: the storage pool of its disks, deleted with it

    def commands(self, advice: Advice, uri: str) -> tuple[str, str]:
        """How to look at the kept state, and how to delete it (a kept clone: with its storage)."""
        assert self.snapshot is not None, "only a kept state has commands"
        look = advice.revert(uri, self.guest, self.snapshot)
        if self.pool:
            return look, advice.remove_guest(uri, self.guest, self.pool)
        return look, advice.delete_snapshot(uri, self.guest, self.snapshot)


def keep(machine: Machine, guest: str, nodeid: str, run_id: str, limit: int) -> Kept:
    """Save the guest's state as a snapshot kept for the user, unless the run kept ``limit`` already.

    The caller holds the guest's lock: counting and creating cannot race another
    process of the run.
    """
    ours = [record for record in kept_for_user(machine) if record.get("run") == run_id]
    if len(ours) >= limit:
        return Kept(guest, nodeid, None, f"{len(ours)} kept for this run already (kvm_keep_failed_max={limit})")
    # A guest that is shut off (it powered off, or QEMU died) keeps its disks only.
    name = kept_name(nodeid, run_id, len(ours) + 1)
    machine.save_state(name, kept_description({"run": run_id, "test": nodeid, "guest": guest,
                                               "kept_at": time.time()}))
    return Kept(guest, nodeid, name)


def save_screenshot(machine: Machine, directory: Path, stem: str) -> Path:
    mime, image = machine.screenshot()
    path = directory / f"{stem}.png"
    path.write_bytes(image if mime == "image/png" else png_from_ppm(image))
    return path


def save_console(tail: ConsoleTail, mark: ConsoleMark, directory: Path, stem: str) -> Path | None:
    """The test's whole console output (not only the last lines) as a file."""
    if mark.path is None or mark.unavailable or not tail.total:
        return None
    full = console_since(tail.guest, mark, lines=tail.total)
    path = directory / f"{stem}.console.log"
    path.write_text("\n".join(full.lines) + "\n")
    return path
