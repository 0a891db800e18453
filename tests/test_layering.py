"""The package's import structure, read with ``ast`` from every file of ``lightning_tiger/``.

Layers, lowest first (a file may import its own subpackage and any lower layer, nothing at or above its own
layer elsewhere):

0. ``validation`` (helpers that import no lightning_tiger code)
1. ``optim``, ``plotting`` (TensorBoard figure helpers; they use ``validation``)
2. ``nn``
3. ``generative`` (the math the LightningModules, data modules and metrics share; may use ``nn``)
4. ``data``, ``metrics``
5. ``callbacks``, ``plugins``, ``modules`` (LightningModules only)
6. ``cli``, the package ``__init__``
7. ``__main__`` (runs the CLI)

Also: no import cycles between files, no ``lightning_tiger`` import inside a function (the usual way to hide
a cycle or an upward import), and no private name (``_x``) imported from another file unless the importer
lives inside the package that owns it (``lightning_tiger.optim._fused`` may be used by ``optim/`` only).
Imports under ``if TYPE_CHECKING:`` never run and are skipped.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lightning_tiger"
PKG = "lightning_tiger"

LAYERS: dict[str, int] = {
    "validation": 0,
    "optim": 1, "plotting": 1,
    "nn": 2,
    "generative": 3,
    "data": 4, "metrics": 4,
    "callbacks": 5, "plugins": 5, "modules": 5,
    "cli": 6, "__init__": 6,
    "__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


FILES = sorted(p for p in ROOT.rglob("*.py") if "csrc" not in p.parts)
MODULES = {_module_name(p): p for p in FILES}


def _unit(module: str) -> str:
    """The layer unit of a module: its subpackage, or the top-level file's name."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _is_package(module: str) -> bool:
    return module in MODULES and MODULES[module].name == "__init__.py"


@dataclass(frozen=True)
class Import:
    target: str  # the lightning_tiger module imported (a file of the package)
    names: tuple[str, ...]  # names taken from it (empty for ``import x``)
    line: int
    local: bool  # inside a function body


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, source: str) -> list[Import]:
    tree = ast.parse(source)
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt, local)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PKG:
                        found.append(Import(_existing(alias.name), (), child.lineno, local))
            elif isinstance(child, ast.ImportFrom):
                source = _resolve(module, child)
                if source.split(".")[0] != PKG:
                    continue
                for alias in child.names:
                    sub = f"{source}.{alias.name}"
                    if sub in MODULES:  # ``from pkg import submodule``
                        found.append(Import(sub, (), child.lineno, local))
                    else:
                        found.append(Import(_existing(source), (alias.name,), child.lineno, local))
            visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _existing(module: str) -> str:
    while module not in MODULES and "." in module:
        module = module.rsplit(".", 1)[0]
    return module


IMPORTS = {m: _imports(m, p.read_text(encoding="utf-8")) for m, p in MODULES.items()}


def _layer_errors(module: str, imports: list[Import]) -> list[str]:
    unit, errors = _unit(module), []
    for imp in imports:
        target_unit = _unit(imp.target)
        if target_unit == unit:
            continue
        if target_unit == "__init__" and not imp.names:
            continue  # ``import lightning_tiger`` alone
        if LAYERS[target_unit] >= LAYERS[unit]:
            errors.append(f"line {imp.line}: {unit} (layer {LAYERS[unit]}) imports {imp.target} "
                          f"(layer {LAYERS[target_unit]})")
    return errors


def _local_errors(imports: list[Import]) -> list[str]:
    return [f"line {i.line}: function-local import of {i.target}" for i in imports if i.local]


def _owner(name_path: str) -> str:
    """The package that owns a private name or module: everything up to its first ``_x`` component."""
    parts = name_path.split(".")
    for k, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:k])
    return ""


def _private_errors(module: str, imports: list[Import]) -> list[str]:
    errors = []
    for imp in imports:
        for path in [f"{imp.target}.{n}" for n in imp.names] or [imp.target]:
            owner = _owner(path)
            if owner and imp.target != module and not (module == owner or module.startswith(owner + ".")):
                errors.append(f"line {imp.line}: private {path} imported from outside {owner}")
    return errors


def _cycles(graph: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every module that lies on an import cycle -> one cycle through it."""
    on_cycle: dict[str, list[str]] = {}
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    on_cycle.setdefault(start, [*path, start])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return on_cycle


# Module-level and function-local imports both count: a local import only delays the cycle.
CYCLES = _cycles({m: sorted({i.target for i in IMPORTS[m] if i.target != m}) for m in MODULES})

@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module: str) -> None:
    errors = _layer_errors(module, IMPORTS[module])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_local_package_imports(module: str) -> None:
    errors = _local_errors(IMPORTS[module])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_files(module: str) -> None:
    errors = _private_errors(module, IMPORTS[module])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_cycles(module: str) -> None:
    assert module not in CYCLES, " -> ".join(CYCLES.get(module, []))


# The pieces the LightningModules are built from (they use Trainer, callbacks and hparams, so they belong to this
# layer, not to the math below it); each is used by the modules only.
MODULE_SUPPORT = {
    "lightning_tiger.modules.defaults": "the optimizer / schedule / EMA / hparams convention of the three modules",
    "lightning_tiger.modules.sample_validation": "the EMA-aware validation-by-sampling mixin of the diffusion modules",
}


def test_modules_holds_only_lightning_modules() -> None:
    """Every file of ``modules/`` defines a LightningModule (the shared math lives in ``generative/``), apart from
    the named support files, which only the LightningModules import."""
    for support in MODULE_SUPPORT:
        users = {m for m, imports in IMPORTS.items() if any(i.target == support for i in imports)}
        assert users and all(_unit(m) == "modules" for m in users), (support, users)
    for module, path in MODULES.items():
        if _unit(module) != "modules" or _is_package(module) or module in MODULE_SUPPORT:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bases = {ast.unparse(b) for node in tree.body if isinstance(node, ast.ClassDef) for b in node.bases}
        assert bases & {"pl.LightningModule", "L.LightningModule", "LightningModule"}, module


def test_the_checker_sees_what_it_must_refuse() -> None:
    """The rules catch the patterns of the old tree (so a green run means something)."""
    probe = "lightning_tiger.metrics.probe"
    imports = _imports(probe, (
        "from lightning_tiger.modules import rectified_flow\n"
        "from lightning_tiger.metrics.functional import _check_pair\n"
        "def f():\n    from lightning_tiger.data.toy2d import sample_toy\n"
    ))
    assert _layer_errors(probe, imports) == [
        "line 1: metrics (layer 4) imports lightning_tiger.modules.rectified_flow (layer 5)",
        "line 4: metrics (layer 4) imports lightning_tiger.data.toy2d (layer 4)",
    ]
    assert _local_errors(imports) == ["line 4: function-local import of lightning_tiger.data.toy2d"]
    assert _private_errors(probe, imports) == [
        "line 2: private lightning_tiger.metrics.functional._check_pair imported from outside "
        "lightning_tiger.metrics.functional"
    ]
    # The old data/reflow.py <-> modules/rectified_flow.py cycle (both sides through local imports).
    graph = {"data.reflow": ["modules.rectified_flow"], "modules.rectified_flow": ["data.reflow", "nn"], "nn": []}
    assert _cycles(graph) == {"data.reflow": ["data.reflow", "modules.rectified_flow", "data.reflow"],
                              "modules.rectified_flow": ["modules.rectified_flow", "data.reflow",
                                                         "modules.rectified_flow"]}
