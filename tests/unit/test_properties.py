"""Property-based tests: arbitrary values, names with any characters, any order of units.

For the parts that take input from users and from files: the settings
resolver, the marker's signature, the unit-edge decisions, run records read
back from a (possibly shared, possibly hand-edited) lock directory, and the
names the plugin derives from test ids and guest names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pytest_kvmsnap import postmortem
from pytest_kvmsnap.config import REVERT_MODES, SCOPES, SETTINGS, Settings, resolve
from pytest_kvmsnap.exceptions import ConfigError
from pytest_kvmsnap.locking import lock_key
from pytest_kvmsnap.markers import MarkerArgs, kvm_snapshot
from pytest_kvmsnap.records import RunRecord, load_record
from pytest_kvmsnap.units import reverts_at_end, reverts_at_start

HMP_SAFE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
FILE_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,150}$")
anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.lists(st.text(), max_size=3))


class FakeConfig:
    """What resolve() reads of a pytest config: options and ini values."""

    def __init__(self, options: dict[str, Any], ini: dict[str, Any]) -> None:
        self.options, self.ini = options, ini

    def getoption(self, name: str) -> Any:
        return self.options.get(name)

    def getini(self, name: str) -> Any:
        return self.ini.get(name)


values = st.dictionaries(st.sampled_from([s.dest for s in SETTINGS]), st.one_of(st.text(), st.integers()))


@settings(max_examples=300)
@given(options=values, ini=values, env=st.dictionaries(st.sampled_from(["LIBVIRT_DEFAULT_URI", "X"]), st.text()))
@example(options={}, ini={"kvm_keep_failed_max": "\u00b2", "kvm_clones": "\u00b2"}, env={})  # isdigit() took '²'
def test_the_resolver_gives_valid_settings_or_one_config_error(options: dict[str, Any], ini: dict[str, Any],
                                                               env: dict[str, str]) -> None:
    for name in ("kvm_domains", "kvm_uri"):  # a repeatable option and a linelist ini value are lists
        for source in (options, ini):
            if name in source:
                source[name] = [str(source[name])]
    problem = ""
    try:
        result = resolve(FakeConfig(options, ini), env)  # type: ignore[arg-type]
    except ConfigError as exc:
        problem = str(exc)
    if problem:
        assert "\n" not in problem  # one line
        return
    assert isinstance(result, Settings)
    assert result.revert in REVERT_MODES and result.scope in SCOPES
    assert result.lock_timeout >= 0 and result.wait_timeout >= 0 and result.keep_failed_max >= 0


@given(domains=st.lists(anything, max_size=3), revert=anything, scope=anything, snapshot=anything)
def test_the_marker_signature_accepts_valid_arguments_and_refuses_the_rest(
        domains: list[Any], revert: Any, scope: Any, snapshot: Any) -> None:
    valid = (all(isinstance(d, str) and d for d in domains) and revert in (None, *REVERT_MODES)
             and scope in (None, *SCOPES) and (snapshot is None or (isinstance(snapshot, str) and snapshot)))
    try:
        args = kvm_snapshot(*domains, revert=revert, scope=scope, snapshot=snapshot)
    except (TypeError, ValueError):
        assert not valid
        return
    assert valid and args == MarkerArgs(tuple(domains), revert, scope, snapshot)


@given(names=st.lists(st.text(min_size=1), min_size=1, max_size=3))
def test_guest_names_with_any_characters_are_data(names: list[str]) -> None:
    assert kvm_snapshot(*names).domains == tuple(names)
    keys = {lock_key("qemu:///system", name) for name in names}
    assert len(keys) == len(set(names))  # no two guests share a lock
    assert all(FILE_SAFE.match(key) for key in keys)


# A unit: its revert mode, whether one of its tests failed, whether the previous holder owed a revert.
units = st.lists(st.tuples(st.sampled_from(REVERT_MODES), st.booleans(), st.booleans()), min_size=1, max_size=12)


@settings(max_examples=300)
@given(sequence=units)
def test_any_order_of_units_keeps_the_promise(sequence: list[tuple[str, bool, bool]]) -> None:
    """A unit that reverts before, or follows a unit that reverted after, or inherits an owed
    revert, starts at its baseline; a guest already at the baseline is never reverted again."""
    baseline = "base"
    at: str | None = baseline  # the guest is clean at the run's baseline at first
    previous_left_clean = True
    for mode, failed, owed in sequence:
        was_clean = at == baseline
        if reverts_at_start(mode, at, baseline, owed=owed):
            assert not was_clean, "a revert of a guest already at its baseline"
            at = baseline
        if mode in ("before", "both") or owed or previous_left_clean:
            assert at == baseline, f"unit {mode} (owed={owed}) began on a dirty guest"
        at = None  # its tests used the guest
        if reverts_at_end(mode, failed=failed, forced=False):
            at = baseline
        previous_left_clean = at == baseline


@settings(max_examples=300)
@given(data=st.one_of(st.dictionaries(st.sampled_from([f for f in RunRecord.__dataclass_fields__] + ["x"]),
                                      st.recursive(anything, lambda inner: st.lists(inner, max_size=3)
                                                   | st.dictionaries(st.text(), inner, max_size=3))),
                      anything))
def test_any_record_file_is_read_as_a_record_or_ignored_with_a_warning(
        tmp_path_factory: pytest.TempPathFactory, data: Any) -> None:
    path = tmp_path_factory.mktemp("records") / "g.json"
    path.write_text(json.dumps(data))
    warnings: list[str] = []
    record = load_record(path, warnings.append)
    assert (record is None) == bool(warnings)
    if record is not None:
        assert isinstance(record.run_id, str) and isinstance(record.owner_pid, int)
        record.describe()  # what a waiting run prints about it: no crash either
        record.owner_alive()


@given(text=st.binary(max_size=200))
def test_a_torn_record_is_ignored_with_one_warning(tmp_path_factory: pytest.TempPathFactory, text: bytes) -> None:
    path: Path = tmp_path_factory.mktemp("records") / "g.json"
    path.write_bytes(b'{"uri": "u", "domain": ' + text)
    warnings: list[str] = []
    assert load_record(path, warnings.append) is None
    assert len(warnings) == 1 and str(path) in warnings[0]


@given(nodeid=st.text(), guest=st.text(), run=st.from_regex(r"[0-9a-f]{12}", fullmatch=True),
       number=st.integers(1, 10**6))
def test_derived_names_are_safe_for_qemu_and_file_systems(nodeid: str, guest: str, run: str, number: int) -> None:
    assert HMP_SAFE.match(postmortem.kept_name(nodeid, run, number))
    stem = postmortem.file_stem(nodeid, guest)
    assert FILE_SAFE.match(stem) or stem == ""
