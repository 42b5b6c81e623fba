"""The commands a message advises a user to type, in libvirt's own tool: virsh.

Quoted for a POSIX shell, with ``-c URI`` so that they reach the guest's
hypervisor wherever it is; a kept clone is removed with virsh alone (no ``rm``)
for the same reason.  No pytest here.
"""

from __future__ import annotations

import shlex


class VirshAdvice:
    def _virsh(self, uri: str, *args: str) -> str:
        return shlex.join(["virsh", "-c", uri, *args])

    def revert(self, uri: str, guest: str, snapshot: str) -> str:
        return self._virsh(uri, "snapshot-revert", guest, snapshot)

    def delete_snapshot(self, uri: str, guest: str, snapshot: str) -> str:
        return self._virsh(uri, "snapshot-delete", guest, snapshot)

    def remove_guest(self, uri: str, guest: str, pool: str) -> str:
        return " && ".join([
            self._virsh(uri, "undefine", guest, "--snapshots-metadata", "--remove-all-storage"),
            *(self._virsh(uri, step, pool) for step in ("pool-destroy", "pool-delete", "pool-undefine"))])

    def save_state(self, guest: str) -> str:
        return f"virsh snapshot-create-as {shlex.quote(guest)} NAME"
