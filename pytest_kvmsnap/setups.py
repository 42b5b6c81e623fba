"""What happens as a marked test's fixtures set up: layers (layering.py) and guest setups
kept across runs (reuse.py).  plugin.py's ``pytest_fixture_setup`` wrapper delegates here.

A reused guest setup's body is not run: ``@guest_setup`` wraps the fixture,
and for that one setup the wrapper returns the kept value (reuse.handed), so
pytest still calls it, caches the value and tears the fixture down as usual.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import pytest

from pytest_kvmsnap import __version__, reuse
from pytest_kvmsnap.coordinator import Coordinator
from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.layers import Fixture
from pytest_kvmsnap.markers import Spec
from pytest_kvmsnap.ownership import SetupRecord
from pytest_kvmsnap.session import COORDINATOR_KEY, CURRENT_KEY, PREPARED_KEY, PROTECTED_KEY, run_id

T = TypeVar("T")
# Fixtures of pytest itself and of these plugins change no guest: they build no layer.
_NO_GUEST_STATE = ("_pytest.", "pytest.", "pytest_kvmsnap.", "xdist.")
# fixture name -> the definition last set up under it (a guest setup's key takes its dependencies' sources)
_SEEN_KEY = pytest.StashKey[dict[str, "pytest.FixtureDef[Any]"]]()
_SAID_KEY = pytest.StashKey[set[str]]()  # guest setups already said to be not kept


def or_fail(step: Callable[[], T], quiet: bool = False) -> T | None:
    """Run a coordinator step and return what it returns; its error fails the test as one line
    (``quiet``: returns None instead).

    pytest.fail is called outside the ``except`` block so that the report does
    not chain "During handling of the above exception" onto the message.
    """
    try:
        return step()
    except KvmSnapError as exc:
        error = exc
    if not quiet:  # quiet: the teardown's own error is already being reported
        pytest.fail(f"kvmsnap: {error}", pytrace=False)
    return None


def current_layering(config: pytest.Config) -> tuple[Coordinator, Spec, pytest.Item] | None:
    """The coordinator, spec and item of the marked test whose fixtures set up now, if any."""
    item = config.stash.get(CURRENT_KEY, None)
    if item is None or COORDINATOR_KEY not in config.stash or not item.stash.get(PROTECTED_KEY, False):
        return None
    return config.stash[COORDINATOR_KEY], item.stash[PREPARED_KEY], item


def fixture_scope(fixturedef: pytest.FixtureDef[Any], item: pytest.Item) -> str:
    """How long pytest keeps the fixture for ``item``: a class-scoped one on a test outside a
    class is set up for each test (pytest falls back to the function)."""
    if fixturedef.scope == "class" and item.getparent(pytest.Class) is None:
        return "function"
    return fixturedef.scope


def fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Generator[None, Any, Any]:
    """Checkpoint what wider fixtures built before a narrower one sets up; note a wider one
    that set up; keep or reuse a guest setup.  A fixture that fails in setup is noted nowhere."""
    request.config.stash.setdefault(_SEEN_KEY, {})[fixturedef.argname] = fixturedef
    layering = current_layering(request.config)
    if layering is None:
        return (yield)
    coordinator, spec, item = layering
    scope = fixture_scope(fixturedef, item)
    or_fail(lambda: coordinator.layering.before_setup(spec, scope, item.nodeid))
    fixture = Fixture(id(fixturedef), fixturedef.argname, scope)
    if reuse.setup_mark(fixturedef.func) is not None:
        return (yield from _guest_setup(coordinator, spec, item, fixturedef, request, fixture))
    try:
        result = yield
    except BaseException:
        coordinator.layering.fixture_failed(fixture)
        raise
    if not getattr(fixturedef.func, "__module__", "").startswith(_NO_GUEST_STATE):
        or_fail(lambda: coordinator.layering.fixture_set_up(spec, fixture))
    return result


def _guest_setup(coordinator: Coordinator, spec: Spec, item: pytest.Item, fixturedef: pytest.FixtureDef[Any],
                 request: pytest.FixtureRequest, fixture: Fixture) -> Generator[None, Any, Any]:
    """Reuse the setup kept under its key, or run it and keep it; where it cannot be kept, run
    it as any fixture and say why once."""
    layering = coordinator.layering
    refusal = layering.setup_refusal(spec, fixture)
    if refusal is not None:
        if fixture.name not in request.config.stash.setdefault(_SAID_KEY, set()):
            request.config.stash[_SAID_KEY].add(fixture.name)
            coordinator.report_incident(f"kvmsnap: guest setup {fixture.name!r} is not kept for later runs: "
                                        f"{refusal}")
        try:
            result = yield
        except BaseException:
            layering.fixture_failed(fixture)
            raise
        or_fail(lambda: layering.fixture_set_up(spec, fixture))
        return result
    variant = repr(getattr(request, "param", None))
    key = reuse.digest({"plugin": __version__, "fixture": fixture.name, "scope": fixture.scope, "variant": variant,
                        "user key": reuse.setup_mark(fixturedef.func), "source": _source(fixturedef, request.config),
                        "bases": or_fail(lambda: layering.bases(spec))})
    kept = or_fail(lambda: layering.reuse_setup(spec, fixture, key, item.nodeid))
    if kept is not None:
        with reuse.handed(fixturedef.func, json.loads(kept)):
            return (yield)
    or_fail(lambda: layering.record_setup(spec, item.nodeid))
    try:
        result = yield
    except BaseException:
        layering.fixture_failed(fixture)
        raise
    value = reuse.plain(result)
    if value is None:
        coordinator.report_incident(f"kvmsnap: guest setup {fixture.name!r} is not kept for later runs: it returned "
                                    f"a {type(result).__name__}, not plain data (JSON, up to {reuse.MAX_VALUE} "
                                    "characters)")
        or_fail(lambda: layering.fixture_set_up(spec, fixture))
        return result
    record = SetupRecord(key, fixture.name, variant, value, time.time(), run_id(request.config))
    or_fail(lambda: layering.keep_setup(spec, fixture, record))
    return result


def _source(fixturedef: pytest.FixtureDef[Any], config: pytest.Config, seen: frozenset[str] = frozenset()) -> str:
    """The digest of the files defining the fixture and, in turn, each fixture it depends on
    (as set up for this test: pytest sets dependencies up first)."""
    known = config.stash.get(_SEEN_KEY, {})
    depends = [_source(known[name], config, seen | {fixturedef.argname})
               for name in fixturedef.argnames if name in known and name not in seen and name != fixturedef.argname]
    return reuse.source_digest(fixturedef.func, depends)
