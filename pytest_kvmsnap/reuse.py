"""Guest setups kept across runs: a fixture marked ``@guest_setup`` runs once, and later
runs with the same *key* start from the snapshot of its layer instead of running it.

The key is everything that could change what the fixture leaves on the guest,
as far as the plugin can see it: the plugin's version; the guests and the very
base snapshot each starts from (its name and creation time, so a base made anew
under the same name is another base); the fixture's name, parameter and the
source of the files that define it and every fixture it depends on, each
dependency with its own dependencies; and the user's own ``key=`` for what
lives outside those files (a package mirror, a downloaded file).  A kept
setup is found by its key, written inside the snapshot, never by its name, so
nothing made under another key is ever reverted to.  Pure decisions: no
pytest, no engine.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

from pytest_kvmsnap.ownership import SetupRecord

F = TypeVar("F", bound=Callable[..., Any])
MARK = "_kvmsnap_guest_setup"
BOUND = 3  # kept setups per guest: the oldest beyond it are deleted
MAX_VALUE = 32 * 1024  # characters of JSON a kept setup may return (it lives in the snapshot's description)


_NOTHING = object()
# guest setup function -> the kept value its next call returns instead of running its body
_HANDED: dict[Callable[..., Any], object] = {}


def guest_setup(func: F | None = None, *, key: str = "") -> Any:
    """Mark a fixture (below ``@pytest.fixture``) whose effects live on the guest and whose
    return value is plain data: with a fixed base snapshot, later runs reuse its layer.

    ``key``: anything else its effects depend on (a version string, a URL).
    """
    def mark(target: F) -> F:
        if hasattr(target, "_get_wrapped_function") or hasattr(target, "_pytestfixturefunction"):
            raise TypeError(f"@guest_setup goes below @pytest.fixture (on {target.__name__})")
        if inspect.isgeneratorfunction(target):
            raise TypeError(f"@guest_setup fixture {target.__name__} yields: a kept setup has no teardown "
                            "(the guest leaves its layer when the fixture ends); return its value instead")

        @functools.wraps(target)  # pytest reads the fixture's arguments through __wrapped__
        def setup(*args: Any, **kwargs: Any) -> Any:
            kept = _HANDED.pop(setup, _NOTHING)
            return target(*args, **kwargs) if kept is _NOTHING else kept

        setattr(setup, MARK, key)
        return cast(F, setup)
    return mark if func is None else mark(func)


@contextlib.contextmanager
def handed(func: Callable[..., Any], value: object) -> Iterator[None]:
    """While pytest sets the guest setup ``func`` up, its call returns ``value`` (the kept one)
    and its body does not run."""
    _HANDED[func] = value
    try:
        yield
    finally:
        _HANDED.pop(func, None)


def setup_mark(func: object) -> str | None:
    """The user's ``key=`` of a fixture marked ``@guest_setup`` ('' if none); None if unmarked."""
    value = getattr(func, MARK, None)
    return value if isinstance(value, str) else None


def source_digest(func: Callable[..., Any], own_digests: Iterable[str]) -> str:
    """A fixture's part of a key: the text of the file that defines it, and the digests of the
    fixtures it depends on.  The whole file, not the function: helpers beside it count."""
    func = inspect.unwrap(func)  # @guest_setup's wrapper lives here, the fixture in the user's file
    try:
        text = Path(inspect.getfile(func)).read_text(errors="replace")
    except (OSError, TypeError):
        text = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
    return digest({"source": text, "depends": sorted(own_digests)})


def digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def snapshot_name(fixture: str, key: str) -> str:
    return f"kvmsnap-setup-{fixture}-{key[:16]}"


def plain(value: object) -> str | None:
    """The value as JSON if it is plain data that comes back equal (and is not too long)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return None
    return text if len(text) <= MAX_VALUE and json.loads(text) == value else None


def to_delete(kept: list[tuple[str, SetupRecord]], new: SetupRecord, new_name: str) -> list[str]:
    """The kept setups of one guest to delete once ``new`` is kept: the same fixture and
    variant under another key (replaced), then the oldest beyond BOUND -- never one this run
    kept, which another of its processes may be using as a layer now."""
    replaced = [name for name, record in kept if name != new_name and record.fixture == new.fixture
                and record.variant == new.variant and record.key != new.key and record.run_id != new.run_id]
    rest = sorted(((record.created, name) for name, record in kept if name != new_name and name not in replaced),
                  reverse=True)
    older = [name for _created, name in rest[BOUND - 1:]]
    return replaced + [name for name in older if dict(kept)[name].run_id != new.run_id]
