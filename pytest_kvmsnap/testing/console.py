"""Run shell commands in the test guest over its serial console.

The guest's init runs a tiny loop on ttyS0 (raw mode, no echo) that reads one
line ``<id> <base64 command>``, runs the command and answers with
``@@B <id>`` ... ``@@E <id> <status>``.  Each call opens its own connection to
the console socket: a libvirt revert restarts QEMU, which recreates the socket,
and an in-place ``loadvm`` keeps it, so a per-call connection works for both.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import socket
import time
from dataclasses import dataclass

_ids = itertools.count(1)


class ConsoleError(RuntimeError):
    """The guest did not answer on its console in time."""


@dataclass(frozen=True)
class Result:
    status: int
    output: str


class Console:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def run(self, command: str, timeout: float = 20.0) -> Result:
        """Run ``command`` with the guest's ``sh`` and return its status and output."""
        token = f"{os.getpid()}x{next(_ids)}"
        line = f"{token} {base64.b64encode(command.encode()).decode()}\n"
        pattern = re.compile(
            rf"@@B {token}\r?\n(.*?)@@E {token} (\d+)\r?\n".encode(), re.DOTALL
        )
        deadline = time.monotonic() + timeout
        with self._connect(deadline) as sock:
            sock.sendall(line.encode())
            data = self._read_until(sock, pattern, deadline)
        match = pattern.search(data)
        assert match is not None
        output = match.group(1).decode(errors="replace")
        return Result(int(match.group(2)), output.rstrip("\n"))

    def check(self, command: str, timeout: float = 20.0) -> str:
        """Like :meth:`run`, but raise unless the command exits 0."""
        result = self.run(command, timeout)
        if result.status != 0:
            raise ConsoleError(f"{command!r} exited {result.status}: {result.output}")
        return result.output

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait until the guest's console loop answers; return the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self.run("echo ready", timeout=min(2.0, deadline - time.monotonic())).output == "ready":
                    return time.monotonic() - start
            except (OSError, ConsoleError) as exc:
                last = exc
                time.sleep(0.05)  # the socket is not there yet: QEMU is starting
        raise ConsoleError(f"guest console {self.socket_path} not ready after {timeout:.0f} s: {last}")

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        return sock

    @staticmethod
    def _read_until(sock: socket.socket, pattern: re.Pattern[bytes], deadline: float) -> bytes:
        data = b""
        while not pattern.search(data):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConsoleError(f"no answer from guest; got {data[-200:]!r}")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConsoleError(f"console closed; got {data[-200:]!r}")
            data += chunk
        return data
