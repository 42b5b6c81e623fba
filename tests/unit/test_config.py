"""Settings: names, precedence (marker > CLI > ini > env > default) and validation."""

from __future__ import annotations

import pytest

from pytest_kvmsnap.config import DEFAULT_URI, Settings, resolve


def settings(pytester: pytest.Pytester, *args: str, ini: str = "", env: dict[str, str] | None = None) -> Settings:
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    return resolve(pytester.parseconfig(*args), env=env or {})


def test_defaults(pytester: pytest.Pytester) -> None:
    assert settings(pytester) == Settings(uri=DEFAULT_URI, uris=(DEFAULT_URI,))


def test_env_uri_used_when_nothing_else(pytester: pytest.Pytester) -> None:
    assert settings(pytester, env={"LIBVIRT_DEFAULT_URI": "test:///default"}).uri == "test:///default"


def test_ini_beats_env_and_cli_beats_ini(pytester: pytest.Pytester) -> None:
    env = {"LIBVIRT_DEFAULT_URI": "qemu:///session"}
    ini = "kvm_uri = test:///default\nkvm_revert = before\nkvm_domains =\n    web\n    db"
    got = settings(pytester, ini=ini, env=env)
    assert (got.uri, got.revert, got.domains) == ("test:///default", "before", ("web", "db"))
    got = settings(pytester, "--kvm-uri=qemu:///system", "--kvm-revert=never",
                   "--kvm-domain=a", "--kvm-domain=b", ini=ini, env=env)
    assert (got.uri, got.revert, got.domains) == ("qemu:///system", "never", ("a", "b"))


def test_flag_and_scope(pytester: pytest.Pytester) -> None:
    got = settings(pytester, "--kvm-keep-snapshot", "--kvm-scope=module", "--kvm-snapshot=clean")
    assert (got.keep_snapshot, got.scope, got.snapshot) == (True, "module", "clean")


def test_bad_ini_value_is_one_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nkvm_revert = sometimes\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*kvm_revert = 'sometimes' is not one of after, before, both, on-failure, never*"])


def test_bad_cli_value_lists_choices(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--kvm-scope=galaxy")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid choice: 'galaxy'*function*class*module*package*session*"])


def test_help_works_without_libvirt(pytester: pytest.Pytester) -> None:
    # A libvirt that cannot be imported, first on the path: --help must not care.
    pytester.makepyfile(libvirt="raise ImportError('no libvirt on this machine')")
    pytester.syspathinsert()
    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*--kvm-revert=REVERT*"])


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("-p", "no:kvmsnap", "--help")
    assert "--kvm-revert" not in result.stdout.str()


def test_marker_is_registered_with_signature(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["*kvm_snapshot(*domains, revert=None, scope=None, snapshot=None)*"])


@pytest.mark.parametrize(("value", "expected", "workers"), [("auto", "auto", 3), ("2", "2", 2), ("0", "0", 0)])
def test_clones_setting(pytester: pytest.Pytester, value: str, expected: str, workers: int) -> None:
    got = settings(pytester, ini=f"kvm_clones = {value}")
    assert got.clones == expected and got.clone_count(3) == workers


def test_bad_clones_value_is_refused(pytester: pytest.Pytester) -> None:
    from pytest_kvmsnap.exceptions import ConfigError

    with pytest.raises(ConfigError, match="is not 'auto' or a number of clones"):
        settings(pytester, "--kvm-clones=many")


@pytest.mark.parametrize("where", ["cli", "ini"])
def test_an_old_spelling_still_works_and_says_its_new_name(pytester: pytest.Pytester, where: str) -> None:
    """0.x rule (README "Compatibility"): a renamed value keeps working for a minor release, with a
    deprecation warning naming the new one; the run uses the new one."""
    args = ("--kvm-revert-method=libvirt",) if where == "cli" else ()
    got = settings(pytester, *args, ini="" if args else "kvm_revert_method = libvirt")
    assert got.revert_method == "restart"
    assert got.deprecated == ("kvm_revert_method = 'libvirt' is deprecated: it is now called 'restart' "
                              "(same behaviour); the old name goes in the next minor release",)
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest(*args, "-W", "default")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*PytestDeprecationWarning: kvmsnap: kvm_revert_method = 'libvirt' is "
                                 "deprecated: it is now called 'restart'*"])
