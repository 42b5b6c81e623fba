"""The package's map, enforced: each module imports only modules above it, and
nothing below the pytest glue imports pytest (TYPE_CHECKING imports aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest_kvmsnap

PACKAGE = Path(pytest_kvmsnap.__file__).parent
ENGINE_PACKAGE = "libvirt"
# Top to bottom: a module may import only the modules listed before it.
LAYERS = [
    "exceptions", "config", "events", "figures", "ownership", "processes", "records", "locking", "engine",
    "guestside",
    # the libvirt engine (pytest_kvmsnap/libvirt/): the only modules that know libvirt
    "libvirt.advice", "libvirt.connection", "libvirt.preflight", "libvirt.qemu", "libvirt.snapshots",
    "libvirt.evidence", "libvirt.agent", "libvirt.network", "libvirt.machine", "libvirt.leases", "libvirt.storage",
    "libvirt.clones", "libvirt.engine",
    # what the plugin does, through engine.py's interface
    "postmortem", "deadlock", "units", "layers", "reuse", "resident", "placement", "hypervisor", "heartbeat",
    "revert", "lease", "recovery", "readiness", "guest", "checkpoints", "finishing", "addressing", "provisioning",
    "witness", "holding", "guestops", "layering", "coordinator", "ssh", "clients",
    # the pytest glue
    "markers", "hookspecs", "session", "reports", "fixtures", "setups", "cleanup", "plugin",
]
PYTEST_FREE = LAYERS[:LAYERS.index("markers")]
LIBVIRT_ENGINE = {name for name in LAYERS if name.startswith(ENGINE_PACKAGE + ".")}


def source(module: str) -> Path:
    return PACKAGE / f"{module.replace('.', '/')}.py"


def runtime_imports(module: str) -> set[str]:
    return imports_of(source(module))


def imports_of(path: Path) -> set[str]:
    """Everything the file imports outside ``if TYPE_CHECKING:``, by dotted name; a module
    imported from a package (``from pytest_kvmsnap.libvirt import qemu``) by its own."""
    tree = ast.parse(path.read_text())
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
            for alias in node.names:  # from pytest_kvmsnap.libvirt import qemu: a module, not a name
                if source(f"{node.module}.{alias.name}".removeprefix("pytest_kvmsnap.")).exists():
                    names.add(f"{node.module}.{alias.name}")
    return names


def own(imports: set[str]) -> set[str]:
    """The package's own modules among ``imports``, as map names (a package's __init__ is no module)."""
    found = {name.removeprefix("pytest_kvmsnap.") for name in imports if name.startswith("pytest_kvmsnap.")}
    return {name for name in found if source(name).exists()}


def test_every_module_is_on_the_map() -> None:
    modules = {str(path.relative_to(PACKAGE).with_suffix("")).replace("/", ".") for path in PACKAGE.rglob("*.py")
               if path.name != "__init__.py" and path.relative_to(PACKAGE).parts[0] != "testing"}
    assert modules == set(LAYERS)


def test_imports_go_one_way() -> None:
    for position, module in enumerate(LAYERS):
        below = own(runtime_imports(module)) - set(LAYERS[:position])
        assert not below, f"{module} imports {sorted(below)}, which sit below it on the map"


def test_the_test_guests_package_sits_below_everything() -> None:
    """``testing/`` builds and drives the project's test guests: it may use the plugin's modules,
    and none of them imports it (the plugin runs without it)."""
    for module in LAYERS:
        imports = runtime_imports(module)
        assert not any(name.startswith("pytest_kvmsnap.testing") for name in imports), f"{module} imports testing/"
    for path in (PACKAGE / "testing").glob("*.py"):
        imports = imports_of(path)
        used = {name for name in own(imports) if not name.startswith("testing")}
        assert used <= set(LAYERS), f"testing/{path.name} imports {sorted(used - set(LAYERS))}"
        assert "pytest" not in imports, f"testing/{path.name} imports pytest"


def test_lower_layers_do_not_import_pytest() -> None:
    for module in PYTEST_FREE:
        assert "pytest" not in runtime_imports(module), f"{module} imports pytest"


def test_only_the_libvirt_engine_knows_libvirt() -> None:
    """Above the engine, everything goes through engine.py's interface: a second engine is a
    second implementation of it, not edits all over.  Only the hypervisor names the default."""
    for module in LAYERS[LAYERS.index("libvirt.engine") + 1:]:
        imports = runtime_imports(module)
        mine = own(imports)
        allowed = {"libvirt.engine"} if module == "hypervisor" else set()
        assert not (mine & LIBVIRT_ENGINE) - allowed, f"{module} imports {sorted(mine & LIBVIRT_ENGINE)}"
        assert not {"libvirt", "libvirt_qemu"} & imports, f"{module} imports libvirt"
