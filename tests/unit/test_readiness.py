"""After a revert: the wait settings, the revert hooks and the generation, on libvirt's test driver.

The clock, entropy and SSH waits themselves need a real guest with an agent and
sshd: tests/integration/test_debian.py.
"""

from __future__ import annotations

import pytest

from tests.conftest import TestDriver
from tests.unit.helpers import run_unit, three_tests


@pytest.fixture
def guest(testdriver: TestDriver) -> str:
    return testdriver.define()


@pytest.mark.parametrize(("option", "message"), [
    ("--kvm-wait=sometimes", "kvm_wait = 'sometimes' is not one of agent, ssh, hook, tcp:PORT"),
    ("--kvm-wait=tcp:", "kvm_wait = 'tcp:' is not one of agent, ssh, hook, tcp:PORT"),
    ("--kvm-wait-timeout=-1", "kvm_wait_timeout = '-1' must be 0 or more"),
    ("--kvm-sync-clock=maybe", "invalid choice: 'maybe'"),
])
def test_bad_wait_settings_stop_the_run(pytester: pytest.Pytester, option: str, message: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = run_unit(pytester, option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


HOOK_LOG = """
def pytest_kvmsnap_before_revert(config, domain, snapshot, reason):
    open("hooks.log", "a").write(f"before {reason.split()[0]}\\n")

def pytest_kvmsnap_after_revert(config, domain, generation, seconds, steps):
    open("hooks.log", "a").write(f"after {generation} {'+'.join(steps) or '-'}\\n")
"""


def test_revert_hooks_and_generation(pytester: pytest.Pytester, guest: str) -> None:
    """before_revert right before each revert; after_revert once the next test may use the guest."""
    pytester.makeconftest(HOOK_LOG)
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest}")
        @pytest.mark.parametrize("i", [1, 2, 3])
        def test_t(i, kvm_guest):
            assert kvm_guest.generation == i - 1
    """)
    run_unit(pytester).assert_outcomes(passed=3)
    assert (pytester.path / "hooks.log").read_text().splitlines() == [
        "after 0 -", "before after", "after 1 -", "before after", "after 2 -", "before after"]


def test_wait_hook_is_called_with_the_guest_after_each_revert(pytester: pytest.Pytester, guest: str) -> None:
    pytester.makeconftest("""
        def pytest_kvmsnap_ready(config, guest, timeout):
            open("ready.log", "a").write(f"{guest.name} {guest.generation} {timeout > 0}\\n")
    """)
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester, "--kvm-wait=hook", "-v")
    result.assert_outcomes(passed=3)
    assert (pytester.path / "ready.log").read_text().splitlines() == [f"{guest} {n} True" for n in (0, 1, 2)]
    result.stdout.fnmatch_lines([f"{guest}: baseline * 3 revert(s)*; ready after 3 of them in median * s (hook)"])


def test_wait_hook_without_an_implementation_errors_the_test(pytester: pytest.Pytester, guest: str) -> None:
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester, "--kvm-wait=hook")
    result.assert_outcomes(errors=3)  # the wait stays pending: each test is told, none runs unready
    result.stdout.fnmatch_lines(["*--kvm-wait=hook, but no pytest_kvmsnap_ready hook is implemented*"])


def test_a_failing_wait_hook_errors_the_next_test_and_is_tried_again(pytester: pytest.Pytester, guest: str) -> None:
    pytester.makeconftest("""
        calls = []
        def pytest_kvmsnap_ready(config, guest, timeout):
            calls.append(guest.generation)
            if len(calls) == 2:
                raise RuntimeError("service not up yet")
    """)
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester, "--kvm-wait=hook")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*RuntimeError: service not up yet"])
