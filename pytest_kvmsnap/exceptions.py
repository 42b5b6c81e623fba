"""Errors pytest-kvmsnap raises: each message says what went wrong and what to do."""

from __future__ import annotations

from collections.abc import Iterable


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
    """The hypervisor at a URI could not be reached; the message names the cause and the fix."""


class ConnectionLost(KvmSnapError):
    """The hypervisor's service stopped answering mid-call (restarted, stopped or killed).

    Transient: the plugin reconnects and retries the step once; it is never
    cached as a guest's permanent failure.  ``service`` is what users call it
    (the engine's ``EngineKind.service``: libvirtd).
    """

    def __init__(self, uri: str, action: str, detail: str, service: str = "the hypervisor") -> None:
        super().__init__(
            f"lost the connection to {service} at {uri} while {action} ({detail}): "
            f"{service} was restarted or stopped"
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
    def __init__(self, snapshot: str, domain: str, existing: Iterable[str], create: str = "") -> None:
        """``create``: the engine's command that takes a snapshot of ``domain`` (Advice.save_state)."""
        names = ", ".join(sorted(existing)) or "none"
        how = f" ({create})" if create else ""
        super().__init__(
            f"domain {domain!r} has no snapshot named {snapshot!r}. Its snapshots: {names}. "
            f"Create it{how} or fix snapshot=/--kvm-snapshot."
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
