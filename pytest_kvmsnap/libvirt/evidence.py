"""What a failed test's guest showed: its console log and its screen.

:class:`Evidence` is that part of a :class:`~pytest_kvmsnap.libvirt.machine.LibvirtMachine`.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import libvirt


class Evidence:
    """What the domain ``native`` shows: its console log and its screen."""

    native: libvirt.virDomain

    def console_log(self) -> str | None:
        """The file the guest's first serial console is written to, if it has one:
        a ``<serial type='file'>`` or any serial with a ``<log file=...>``."""
        root = ET.fromstring(self.native.XMLDesc(0))
        for serial in [*root.iterfind("devices/serial"), *root.iterfind("devices/console")]:
            log = serial.find("log")
            if log is not None and log.get("file"):
                return log.get("file")
            source = serial.find("source")
            if serial.get("type") == "file" and source is not None and source.get("path"):
                return source.get("path")
        return None

    def has_screen(self) -> bool:
        """Does the guest have a video device (what libvirt takes a screenshot of)?"""
        root = ET.fromstring(self.native.XMLDesc(0))
        return any(model.get("type") != "none" for model in root.iterfind("devices/video/model"))

    def screenshot(self) -> tuple[str, bytes]:
        """The guest's first screen and its MIME type (PNG where QEMU can, else PPM), through a
        libvirt stream (so it works remotely too)."""
        stream = self.native.connect().newStream(0)
        try:
            mime = str(self.native.screenshot(stream, 0, 0))
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
