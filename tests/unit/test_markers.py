"""Marker validation at collection, and units per scope."""

from __future__ import annotations

import pytest

from tests.conftest import TestDriver


@pytest.mark.parametrize(("args", "message"), [
    ("revert='sometimes'", "*revert='sometimes' is not one of after, before, both, on-failure, never*"),
    ("scope='galaxy'", "*scope='galaxy' is not one of function, class, module, package, session*"),
    ("'g', colour='red'", "*got an unexpected keyword argument 'colour' (usage: kvm_snapshot(*domains, revert=None*"),
    ("42", "*domain names must be non-empty strings, got 42*"),
])
def test_invalid_marker_is_a_usage_error_naming_the_test(
    pytester: pytest.Pytester, args: str, message: str
) -> None:
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot({args})
        def test_x():
            pass
    """)
    result = pytester.runpytest("--kvm-uri=test:///default")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*.py::test_x: invalid @pytest.mark.kvm_snapshot: " + message])


def test_no_domain_configured(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.kvm_snapshot()
        def test_x():
            pass
    """)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_x: no guest to use*--kvm-domain*"])


def test_unused_plugin_opens_no_connection(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # An URI that would fail to open: nothing may try it when no test needs a guest.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(pytester.path))
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest("--kvm-uri=qemu+unix:///system?socket=/nonexistent/sock",
                                "--kvm-domain=x")
    result.assert_outcomes(passed=1)
    assert "= kvmsnap =" not in result.stdout.str()  # no summary: nothing was used
    assert not (pytester.path / "pytest-kvmsnap").exists()  # nor a lock directory


def test_closest_marker_wins(pytester: pytest.Pytester, testdriver: TestDriver, revert_log) -> None:  # type: ignore[no-untyped-def]
    outer, inner = testdriver.define(), testdriver.define()
    pytester.makepyfile(f"""
        import pytest
        pytestmark = pytest.mark.kvm_snapshot("{outer}")

        def test_module_level(kvm_guest):
            assert kvm_guest.name == "{outer}"

        @pytest.mark.kvm_snapshot("{inner}")
        def test_override(kvm_guest, kvm_guests):
            assert kvm_guest.name == "{inner}" and list(kvm_guests) == ["{inner}"]
    """)
    result = pytester.runpytest("--kvm-uri=test:///default")
    result.assert_outcomes(passed=2)
