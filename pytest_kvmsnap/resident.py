"""The resident settle process: the clock and a reseed after a revert, with no guest process started.

Under TCG the first guest process after a ``loadvm`` costs 0.3-0.4 s to start
(QEMU threw its translated code away), and the settle program over ``kvm_ssh``
was one such process per revert: 1.18x a hand-written ``loadvm`` conftest.  So
for a guest whose tests use ``kvm_ssh``, the plugin starts one perl process
through the guest agent just before the run's baseline (guestside.py's
RESIDENT_PERL).  It is in the snapshot, so every revert restores it, asleep on
a loopback port.  After a revert, the connection ``kvm_ssh`` logs in with anyway
opens a channel to that port (sshd connects inside the guest: nothing is
started), and the process sets the clock and reseeds with the host's time and
bytes.  A token only the run knows guards it.  Where it cannot serve (no agent
or perl at the baseline, sshd refuses forwarding, a snapshot without it) the
guest settles as before.

It is the one thing of the plugin's a test can see in the guest (``ps`` shows
``kvmsnap-settle``, ``ss`` its loopback port).  The run stops it after its
final revert; if the run is killed, it exits by itself after RESIDENT_IDLE
seconds without a connection.  No pytest here.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass

from pytest_kvmsnap.engine import Machine
from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.guestside import RESIDENT_PERL, RESIDENT_QUIT_PERL, partial


class ResidentUnavailable(KvmSnapError):
    """The resident process cannot be asked (gone, another run's, or no channel to it): settle another way.
    ``lasting``: it never can in this run (sshd refuses forwarding)."""

    def __init__(self, message: str, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting


@dataclass(frozen=True)
class Resident:
    """Where the resident process listens in the guest, its pid, and the token it obeys."""

    port: int
    pid: int
    token: str

    def as_record(self) -> list[object]:
        return [self.port, self.pid, self.token]

    @classmethod
    def from_record(cls, value: list[object]) -> Resident | None:
        if len(value) != 3:
            return None
        port, pid, token = value
        return cls(port, pid, token) if isinstance(port, int) and isinstance(pid, int) and \
            isinstance(token, str) else None

    def request(self, clock: bool, reseed: bool) -> bytes:
        """The line that asks for the steps, with the host's time now and 64 fresh bytes."""
        steps = ("c" if clock else "") + ("r" if reseed else "")
        return f"{self.token} {time.time():.6f} {os.urandom(64).hex()} {steps}\n".encode()


def held_at(record: list[object], snapshot: str | None, baseline: str, layers_base: str) -> Resident | None:
    """The resident process a guest reverted to ``snapshot`` has: the run's baseline holds it, and so
    do the layers built on it (``layers_base``: what this process's layers are built on, layers.py);
    a snapshot of the user's own, and layers built on one, do not (asking there would only fail).
    Every layer is named after the run's baseline, whatever it was built on: the name cannot tell."""
    on_baseline = snapshot == baseline or (snapshot is not None and snapshot.startswith(f"{baseline}-")
                                           and layers_base == baseline)
    return Resident.from_record(record) if on_baseline else None


def check_answer(answer: str) -> None:
    """Nothing when the process did the steps; else why it did not, as the settle program says it."""
    words = answer.split(maxsplit=2)
    if words == ["ok"]:
        return
    if words[:1] == ["fail"] and len(words) > 1 and words[1].isdigit():
        raise KvmSnapError(partial(int(words[1]), words[2] if len(words) > 2 else ""))
    if words == ["denied"]:
        raise ResidentUnavailable("the process there does not know this run's token (a snapshot from another run)")
    raise ResidentUnavailable(f"it answered {answer.strip()[:100]!r}")


def start(machine: Machine) -> Resident | None:
    """Start the resident process in the guest through its agent (the caller waited for it to
    answer); None where it cannot run there (no perl): that guest settles with one process per revert."""
    token = secrets.token_hex(16)
    try:
        code, out = machine.run_program("/usr/bin/perl", ["-e", RESIDENT_PERL], f"{token}\n")
    except KvmSnapError:
        return None
    words = out.split()
    if code != 0 or len(words) != 2 or not all(word.isdigit() for word in words):
        return None
    return Resident(int(words[0]), int(words[1]), token)


def stop(machine: Machine, resident: Resident) -> bool:
    """Ask the resident process to quit, through the agent (after the final revert restored it):
    the guest as found.  By its token, not its pid: the pid may be another process's by then."""
    code, _out = machine.run_program("/usr/bin/perl", ["-e", RESIDENT_QUIT_PERL, str(resident.port)],
                                     f"{resident.token} quit\n")
    return code == 0
