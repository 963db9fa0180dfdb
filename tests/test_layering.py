"""Structure of the package, checked on the syntax trees (``ast``) of hosm_lightning/: no import cycle
between its modules, no module using another module's private name, a core that imports nothing from
the layers above it, and design-document pointers that resolve. Each check is also run on small
made-up sources, so that it is seen to fail when it should."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hosm_lightning"
#: the Lightning family: the core must not need any of it
LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_package(name: str) -> bool:
    path = MODULES.get(name)
    return path is not None and path.name == "__init__.py"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_module(name: str) -> bool:
    """Whether ``name`` is a module: one of the package's, or an importable library module."""
    if name.startswith("hosm_lightning"):
        return name in MODULES
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def _from_target(module: str, node: ast.ImportFrom, package: bool) -> str:
    """The absolute name of the module in ``from <target> import ...`` written in ``module``."""
    if not node.level:
        return node.module
    base = module.split(".") if package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(tree: ast.AST, module: str, package: bool) -> list[tuple[str, list[str], int]]:
    """Every import anywhere in the module: (imported module, names taken from it, line)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((_from_target(module, node, package), [a.name for a in node.names], node.lineno))
    return out


def _dependencies(tree: ast.AST, module: str, package: bool) -> set[str]:
    """The package modules that importing ``module`` runs: what it imports (``from p import x`` needs the
    submodule p.x if there is one, else p itself) and the packages above those, except its own
    ancestors (already being imported)."""
    deps = set()
    for target, names, _ in _imports(tree, module, package):
        subs = [f"{target}.{n}" for n in names]
        deps.update(m for m in subs if m in MODULES)
        if target in MODULES and (not names or any(m not in MODULES for m in subs)):
            deps.add(target)
    for dep in list(deps):
        parts = dep.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in MODULES and not (module == parent or module.startswith(parent + ".")):
                deps.add(parent)
    deps.discard(module)
    return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of a directed graph found by depth-first search (each as [a, b, ..., a])."""
    state, stack, found = {}, [], []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def _private_uses(tree: ast.AST, module: str, package: bool) -> list[str]:
    """Places where ``module`` takes a private name of another module: ``from x import _y``, an import of
    a private module (``x._y``), or ``m._y`` with m bound to a module by an import (each attribute chain
    is also visited from its inner nodes; the set removes the repeats)."""
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if any(_is_private(p) for p in a.name.split(".")):
                    found.append(f"line {node.lineno}: import {a.name}")
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            target = _from_target(module, node, package)
            if any(_is_private(p) for p in target.split(".")):
                found.append(f"line {node.lineno}: from {target} import ...")
            for a in node.names:
                if _is_private(a.name):
                    found.append(f"line {node.lineno}: from {target} import {a.name}")
                elif _is_module(f"{target}.{a.name}"):
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, value = [], node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in aliases:
            continue
        mod = aliases[value.id]
        for attr in reversed(chain):  # module.submodule...name: stop at the first non-module
            if _is_private(attr):
                found.append(f"line {node.lineno}: {mod}.{attr}")
                break
            if not _is_module(f"{mod}.{attr}"):
                break
            mod = f"{mod}.{attr}"
    return sorted(set(found))


def _parse(name: str) -> ast.AST:
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


# -- import cycles -----------------------------------------------------------------------------------
def test_no_import_cycle_between_the_package_modules():
    graph = {name: _dependencies(_parse(name), name, _is_package(name)) for name in MODULES}
    assert "hosm_lightning.core.dsm" in graph["hosm_lightning.core.objective"]  # the graph is the real one
    assert "hosm_lightning.core" in graph["hosm_lightning.nets.score"]  # importing core.sde runs core/__init__
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    # ``from . import x`` in a package's module, and a submodule importing its own package by name
    tree = ast.parse("from hosm_lightning.core import HOSMObjective")
    assert "hosm_lightning.core" in _dependencies(tree, "hosm_lightning.core.dsm", False)
    tree = ast.parse("from . import sde")
    assert _dependencies(tree, "hosm_lightning.core.dsm", False) == {"hosm_lightning.core.sde"}


# -- private names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODULES))
def test_no_module_uses_another_modules_private_name(name):
    uses = _private_uses(_parse(name), name, _is_package(name))
    assert not uses, f"{MODULES[name].relative_to(ROOT)} uses private names: {uses}"


@pytest.mark.parametrize("source,private", [
    ("from .sde import _LinearBeta", True),
    ("from hosm_lightning.data.synthetic import _make", True),
    ("import torch\ntorch._C", True),
    ("import torch.nn.functional as F\nF._in_projection", True),
    ("from torchdiffeq._impl.odeint import SOLVERS", True),
    ("import torchdiffeq._impl", True),
    ("from . import sde\nsde._LinearBeta", True),
    ("from .sde import SDE, bcast", False),
    ("import torch\ntorch.__version__, torch.nn.functional.silu", False),
    ("obj = object()\nobj._x", False),
    ("from torch import Tensor\nTensor._version", False),
])
def test_the_private_name_check_sees_private_names(source, private):
    assert bool(_private_uses(ast.parse(source), "hosm_lightning.core.dsm", False)) == private


# -- the core ----------------------------------------------------------------------------------------
def test_core_imports_nothing_from_the_layers_above_it():
    """core/ needs neither lit/, nets/, data/, the command line nor Lightning: only itself and the math libraries."""
    core = [name for name in MODULES if name == "hosm_lightning.core" or name.startswith("hosm_lightning.core.")]
    assert len(core) > 5
    bad = []
    for name in core:
        for target, _, line in _imports(_parse(name), name, _is_package(name)):
            top = target.split(".")[0]
            inside = target == "hosm_lightning.core" or target.startswith("hosm_lightning.core.")
            if (top == "hosm_lightning" and not inside) or top in LIGHTNING:
                bad.append(f"{name} line {line}: {target}")
    assert not bad, bad
    # the check reads the imports: a made-up module importing the Lightning layer would fail it
    tree = ast.parse("def f():\n    from ..lit.module import HOSMModule\n    import lightning.pytorch as pl")
    assert [t for t, _, _ in _imports(tree, "hosm_lightning.core.dsm", False)] == [
        "hosm_lightning.lit.module", "lightning.pytorch"]


# -- the design document -----------------------------------------------------------------------------
def test_design_pointers_resolve():
    """Every 'docs/design.md §N' in the package, configs, README, benchmarks and docs names a section
    that exists; no DESIGN.md pointer."""
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, re.M))
    assert len(sections) >= 8
    pointers = 0
    for path in [*PKG.rglob("*.py"), *ROOT.glob("configs/*.yaml"), ROOT / "README.md",
                 *ROOT.glob("benchmarks/*.py"), *ROOT.glob("docs/*.md")]:
        text = path.read_text()
        assert "DESIGN.md" not in text, path
        for sec in re.findall(r"docs/design\.md §(\d+)", text):
            assert sec in sections, (path, sec)
            pointers += 1
    assert pointers > 10
