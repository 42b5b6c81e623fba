"""Errors pytest-kvmsnap raises: each message says what went wrong and what to do."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit


class KvmSnapError(Exception):
    """Base class: a problem with the guest, the hypervisor or the configuration.

    Its message is one line, whatever it quotes: libvirt's and QEMU's errors
    may span several ("...: -5\nError while writing VM state: ...").
    """

    def __str__(self) -> str:
        return " ".join(part.strip() for part in super().__str__().splitlines() if part.strip())


class ConfigError(KvmSnapError):
    """Bad settings or marker arguments."""


class ConnectionFailed(KvmSnapError):
    """The libvirt URI could not be opened."""

    @classmethod
    def from_libvirt(cls, uri: str, detail: str) -> ConnectionFailed:
        lowered = detail.lower()
        remote = urlsplit(uri).hostname  # qemu+ssh://user@host/system: another host's daemon
        # A non-root client of qemu:///system is checked by polkit over D-Bus;
        # without a system bus that fails before any permission answer.
        if remote and any(word in lowered for word in ("publickey", "host key verification")):
            hint = (
                f"SSH to {remote} refused: check the user in the URI, its key (?keyfile=...) and "
                "root's known_hosts for that host"
            )
        elif any(word in lowered for word in ("permission denied", "authentication", "polkit",
                                            "system bus", "access denied", "not authorized")):
            hint = (
                "permission was denied: run as root, add your user to the 'libvirt' group, "
                "or use qemu:///session for guests you own"
            )
        elif remote and any(word in lowered for word in ("connection refused", "unable to connect",
                                                          "no route", "timed out", "could not resolve")):
            hint = (
                f"the hypervisor host {remote} cannot be reached, or its libvirtd does not listen: "
                "check that host (is it up, is libvirtd running there, does the transport's port answer?)"
            )
        elif "no such file" in lowered or "connection refused" in lowered or "failed to connect" in lowered:
            hint = (
                "libvirtd does not seem to be running: start it (systemctl start libvirtd, "
                "or 'libvirtd -d' where no init system runs it; scripts/setup-host.sh does both)"
            )
        else:
            hint = "check the URI (--kvm-uri, ini kvm_uri or LIBVIRT_DEFAULT_URI)"
        return cls(f"cannot open libvirt connection {uri!r}: {hint}.\nlibvirt said: {detail}")


class ConnectionLost(KvmSnapError):
    """libvirtd stopped answering mid-call (restarted, stopped or killed).

    Transient: the plugin reconnects and retries the step once; it is never
    cached as a guest's permanent failure.
    """

    def __init__(self, uri: str, action: str, detail: str) -> None:
        super().__init__(
            f"lost the connection to libvirtd at {uri} while {action} ({detail}): "
            "libvirtd was restarted or stopped"
        )
        self.uri = uri


class DomainNotFound(KvmSnapError):
    def __init__(self, name: str, uri: str, existing: Iterable[str]) -> None:
        names = ", ".join(sorted(existing)) or "none"
        super().__init__(
            f"no domain named {name!r} at {uri}. Domains there: {names}. "
            f"Pass an existing name to @pytest.mark.kvm_snapshot(...) or --kvm-domain."
        )


class SnapshotNotFound(KvmSnapError):
    def __init__(self, snapshot: str, domain: str, existing: Iterable[str]) -> None:
        names = ", ".join(sorted(existing)) or "none"
        super().__init__(
            f"domain {domain!r} has no snapshot named {snapshot!r}. Its snapshots: {names}. "
            f"Create it (virsh snapshot-create-as {domain} NAME) or fix snapshot=/--kvm-snapshot."
        )


class UnsupportedGuest(KvmSnapError):
    """The guest cannot take or revert the internal snapshots the plugin relies on."""


class RevertFailed(KvmSnapError):
    """Going back to the baseline failed; the guest is not used again in this run."""


class LeaseTimeout(KvmSnapError):
    """Another run kept the guest longer than ``kvm_lock_timeout``."""


class LeaseLost(RevertFailed):
    """This run's lease on a guest's hypervisor was not renewed in time, or another run took it
    over: the guest is no longer this run's, and nothing of it is touched again."""


class Deadlock(KvmSnapError):
    """Processes that each hold a guest wait for each other's."""


class LockDirError(KvmSnapError):
    """The lock directory cannot hold a lock or record (full, read-only, gone)."""


class NoDomainConfigured(ConfigError):
    def __init__(self, nodeid: str) -> None:
        super().__init__(
            f"{nodeid}: no guest to use. Name one in the marker "
            f"(@pytest.mark.kvm_snapshot('my-guest')), or set --kvm-domain / ini kvm_domains."
        )
