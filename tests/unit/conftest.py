"""Unit runs keep their locks in a temporary directory, not in the user's default one."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_runtime_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process pytester runs read the environment: their default lock
    # directory ($XDG_RUNTIME_DIR/pytest-kvmsnap) is then a throwaway one.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
