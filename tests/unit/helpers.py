"""Helpers for the unit tests' inner runs on libvirt's in-process test driver."""

from __future__ import annotations

import pytest


def run_unit(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in-process against ``test:///default`` (whose domains live in this process)."""
    return pytester.runpytest("--kvm-uri=test:///default", "-p", "no:randomly", *args)


def three_tests(name: str, **marker: str) -> str:
    """Three marked tests that each see the guest dirty; ``fail_at=N`` makes test N fail."""
    fail_at = marker.pop("fail_at", "0")
    kwargs = "".join(f", {k}={v!r}" for k, v in marker.items())
    return f"""
        import pytest
        @pytest.mark.kvm_snapshot("{name}"{kwargs})
        @pytest.mark.parametrize("i", [1, 2, 3])
        def test_t(i, kvm_guest):
            assert kvm_guest.is_dirty
            assert i != {fail_at}
    """
