"""The package's map, enforced: each module imports only modules above it, and
nothing below the pytest glue imports pytest (TYPE_CHECKING imports aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest_kvmsnap

PACKAGE = Path(pytest_kvmsnap.__file__).parent
# Top to bottom: a module may import only the modules listed before it.
LAYERS = [
    "exceptions", "config", "events", "figures", "ownership", "processes", "records", "locking", "engine",
    # the libvirt engine: the only modules that know libvirt
    "backend", "leasedomain", "storage", "clones", "libvirt_engine",
    # what the plugin does, through engine.py's interface
    "postmortem", "deadlock", "units", "layers", "placement", "hypervisor", "heartbeat", "revert", "lease",
    "recovery", "readiness", "guest", "checkpoints", "finishing", "addressing", "provisioning", "witness",
    "coordinator", "ssh",
    # the pytest glue
    "markers", "hookspecs", "session", "reports", "fixtures", "cleanup", "plugin",
]
PYTEST_FREE = LAYERS[:LAYERS.index("markers")]
LIBVIRT_ENGINE = {"backend", "leasedomain", "storage", "clones", "libvirt_engine"}


def runtime_imports(module: str) -> set[str]:
    """Top-level names of everything ``module`` imports outside ``if TYPE_CHECKING:``."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for node in ast.walk(block)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "pytest_kvmsnap":  # from pytest_kvmsnap import backend, clones
                names.update(f"pytest_kvmsnap.{alias.name}" for alias in node.names)
    return names


def test_every_module_is_on_the_map() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS)


def test_imports_go_one_way() -> None:
    for position, module in enumerate(LAYERS):
        own = {name.split(".")[1] for name in runtime_imports(module) if name.startswith("pytest_kvmsnap.")}
        below = own - set(LAYERS[:position]) - {"testing"}
        assert not below, f"{module} imports {sorted(below)}, which sit below it on the map"


def test_the_test_guests_package_sits_below_everything() -> None:
    """``testing/`` builds and drives the project's test guests: it may use the plugin's modules,
    and none of them imports it (the plugin runs without it)."""
    for module in LAYERS:
        imports = runtime_imports(module)
        assert not any(name.startswith("pytest_kvmsnap.testing") for name in imports), f"{module} imports testing/"
    for path in (PACKAGE / "testing").glob("*.py"):
        tree = ast.parse(path.read_text())
        own = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
               and node.module.startswith("pytest_kvmsnap.") and not node.module.startswith("pytest_kvmsnap.testing")}
        assert own <= {f"pytest_kvmsnap.{name}" for name in LAYERS}, f"testing/{path.name} imports {sorted(own)}"
        assert "pytest" not in {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                                for alias in node.names}, f"testing/{path.name} imports pytest"


def test_lower_layers_do_not_import_pytest() -> None:
    for module in PYTEST_FREE:
        assert "pytest" not in runtime_imports(module), f"{module} imports pytest"


def test_only_the_libvirt_engine_knows_libvirt() -> None:
    """Above the engine, everything goes through engine.py's interface: a second engine is a
    second implementation of it, not edits all over.  Only the hypervisor names the default."""
    for module in LAYERS[LAYERS.index("libvirt_engine") + 1:]:
        imports = runtime_imports(module)
        own = {name.split(".")[1] for name in imports if name.startswith("pytest_kvmsnap.")}
        allowed = {"libvirt_engine"} if module == "hypervisor" else set()
        assert not (own & LIBVIRT_ENGINE) - allowed, f"{module} imports {sorted(own & LIBVIRT_ENGINE)}"
        assert not {"libvirt", "libvirt_qemu"} & imports, f"{module} imports libvirt"
