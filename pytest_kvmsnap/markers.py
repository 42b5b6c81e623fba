"""The ``kvm_snapshot`` marker: its signature, its validation and what it means per test."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pytest_kvmsnap.config import REVERT_MODES, SCOPES, Settings, Spec
from pytest_kvmsnap.exceptions import ConfigError, NoDomainConfigured

__all__ = ["MARKER", "Spec", "kvm_snapshot", "spec_for", "unit_key"]

MARKER = "kvm_snapshot"
FIXTURES = ("kvm_guest", "kvm_guests")
SIGNATURE = f"{MARKER}(*domains, revert=None, scope=None, snapshot=None)"
MARKER_HELP = (
    f"{SIGNATURE}: give the test clean "
    f"libvirt guests. revert: {'/'.join(REVERT_MODES)}; scope: {'/'.join(SCOPES)}; "
    "snapshot: an existing snapshot to start from."
)


@dataclass(frozen=True)
class MarkerArgs:
    domains: tuple[str, ...]
    revert: str | None
    scope: str | None
    snapshot: str | None


def kvm_snapshot(
    *domains: str, revert: str | None = None, scope: str | None = None,
    snapshot: str | None = None,
) -> MarkerArgs:
    """The marker's real signature: calling it validates a marker's arguments."""
    for name in domains:
        if not isinstance(name, str) or not name:
            raise TypeError(f"domain names must be non-empty strings, got {name!r}")
    _check_choice("revert", revert, REVERT_MODES)
    _check_choice("scope", scope, SCOPES)
    if snapshot is not None and (not isinstance(snapshot, str) or not snapshot):
        raise TypeError(f"snapshot must be a non-empty string, got {snapshot!r}")
    return MarkerArgs(tuple(domains), revert, scope, snapshot)


def _check_choice(name: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def marker_args(item: pytest.Item) -> MarkerArgs | None:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return None
    try:
        return kvm_snapshot(*marker.args, **marker.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{item.nodeid}: invalid @pytest.mark.{MARKER}: {exc} (usage: {SIGNATURE})"
        ) from None


def spec_for(item: pytest.Item, settings: Settings) -> Spec | None:
    """The test's :class:`Spec`, or None when it uses neither the marker nor a fixture."""
    args = marker_args(item)
    if args is None:
        if not any(name in getattr(item, "fixturenames", ()) for name in FIXTURES):
            return None
        args = MarkerArgs((), None, None, None)
    domains = args.domains or settings.domains
    if not domains:
        raise NoDomainConfigured(item.nodeid)
    return Spec(
        domains=tuple(dict.fromkeys(domains)),
        revert=args.revert or settings.revert,
        scope=args.scope or settings.scope,
        snapshot=args.snapshot or settings.snapshot,
    )


def unit_key(item: pytest.Item, scope: str) -> str:
    """The id of the unit ``item`` belongs to: tests with one key share guest state.

    Like pytest's class-scoped fixtures, ``class`` scope outside a class is the
    function itself; ``package`` outside a package is the test's directory.
    """
    node: pytest.Item | pytest.Collector | None = None
    if scope == "class":
        node = item.getparent(pytest.Class)
    elif scope == "module":
        node = item.getparent(pytest.Module)
    elif scope == "package":
        node = item.getparent(pytest.Package)
        if node is None:
            return f"dir:{item.path.parent}"
    elif scope == "session":
        return "session"
    return f"{scope}:{node.nodeid}" if node is not None else f"function:{item.nodeid}"

