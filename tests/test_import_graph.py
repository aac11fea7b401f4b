"""The import structure of ``pipeline/``: every module imports, module-level imports form no cycle, no module
imports another ``pipeline`` module from inside a function, and the reward side knows nothing of PPO.

The graph is read from the source with ``ast`` (module-level ``import``/``from ... import``, relative ones resolved;
``if TYPE_CHECKING:`` blocks left out, they never run). Importing ``a.b.c`` also runs the ``__init__`` of ``a.b``,
so an edge to a module is also an edge to each package above it, except the importer's own packages (a package is
always initialised before its submodules).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pipeline"

FUNCTION_LOCAL_ALLOWED: dict[str, set[str]] = {"pipeline.__main__": {"pipeline.report", "pipeline.chat"}}
"""``module -> {imported pipeline module}`` pairs allowed to import inside a function. Not cycles: the command line
imports torch and transformers only for ``report`` and ``chat``, so ``make status`` starts in well under a second."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _sources() -> dict[str, tuple[Path, ast.Module]]:
    """Every module under pipeline/ by dotted name, with its parsed source."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        out[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return out


def _is_package(name: str) -> bool:
    return _sources()[name][0].name == "__init__.py"


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The pipeline modules an import statement in ``module`` loads (without the implicit parent packages)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name == "pipeline" or a.name.startswith("pipeline.")}
    if node.level:
        package = module if _is_package(module) else module.rpartition(".")[0]
        base_parts = package.split(".")
        if node.level > 1:
            base_parts = base_parts[: -(node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base != "pipeline" and not base.startswith("pipeline."):
        return set()
    found = {base}
    for a in node.names:  # `from pkg import submodule` loads the submodule too
        if f"{base}.{a.name}" in _sources():
            found.add(f"{base}.{a.name}")
    return found


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(
    tree: ast.Module,
) -> tuple[list[ast.Import | ast.ImportFrom], list[tuple[str, ast.Import | ast.ImportFrom]]]:
    """(imports that run when the module is imported, (enclosing function, import) pairs inside functions)."""
    top: list[ast.Import | ast.ImportFrom] = []
    local: list[tuple[str, ast.Import | ast.ImportFrom]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:  # the `else:` of `if TYPE_CHECKING:` runs
                    visit(ast.Module(body=[sub], type_ignores=[]), function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (top.append(child) if function is None else local.append((function, child)))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, getattr(child, "name", "<lambda>") if function is None else function)
            else:
                visit(child, function)

    visit(tree, None)
    return top, local


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def _graph() -> dict[str, set[str]]:
    """Module -> the pipeline modules (and the packages above them) its import runs."""
    graph: dict[str, set[str]] = {}
    for name, (_, tree) in _sources().items():
        own = set(_ancestors(name)) | {name}
        edges: set[str] = set()
        for node in _imports(tree)[0]:
            for target in _targets(name, node):
                edges.update(t for t in (target, *_ancestors(target)) if t not in own and t in _sources())
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := dfs(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := dfs(n)):
            return found
    return None


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


_IMPORT_ALL = """
import importlib, json, pkgutil, sys, traceback

def walk(path, prefix):  # pkgutil's walk without importing the packages it walks (walk_packages imports them)
    for m in pkgutil.iter_modules([path]):
        yield prefix + m.name
        if m.ispkg:
            yield from walk(f"{path}/{m.name}", f"{prefix}{m.name}.")

names = sorted(walk(sys.argv[1], "pipeline."))
reward = [n for n in names if n.startswith("pipeline.reward.")]
failed, rl_after_reward = {}, None
for n in ["pipeline.reward", *reward, *(n for n in names if n not in reward)]:
    try:
        importlib.import_module(n)
    except BaseException:
        failed[n] = traceback.format_exc(limit=-3)
    if rl_after_reward is None and n == reward[-1]:
        rl_after_reward = sorted(m for m in sys.modules if m == "pipeline.rl" or m.startswith("pipeline.rl."))
print(json.dumps({"names": names, "failed": failed, "rl_after_reward": rl_after_reward}))
"""


_run: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _import_everything_meanwhile():
    """Start the fresh interpreter first: it imports torch, transformers, TRL... (most of this file's time) while
    the source is read."""
    _run["proc"] = subprocess.Popen(
        [sys.executable, "-c", _IMPORT_ALL, str(PKG)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    yield
    proc = _run.pop("proc")
    _run.pop("result", None)
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _imported() -> dict[str, Any]:
    """Every module under pipeline/ imported in one fresh interpreter, the reward package's first."""
    if "result" not in _run:
        out, err = _run["proc"].communicate(timeout=180)
        assert _run["proc"].returncode == 0, err[-3000:]
        _run["result"] = json.loads(out.strip().splitlines()[-1])
    return _run["result"]


def test_module_level_imports_are_acyclic():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_local_pipeline_imports():
    offenders = []
    for name, (path, tree) in _sources().items():
        for function, node in _imports(tree)[1]:
            for target in sorted(_targets(name, node)):
                if target not in FUNCTION_LOCAL_ALLOWED.get(name, set()):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {function}() imports {target}")
    if offenders:
        print("function-local pipeline imports:\n" + "\n".join(offenders))
    assert not offenders, "function-local pipeline imports:\n" + "\n".join(offenders)


def test_the_reward_package_does_not_import_rl():
    graph = _graph()
    reward = [n for n in _sources() if n == "pipeline.reward" or n.startswith("pipeline.reward.")]
    assert reward
    direct = []
    for name in reward:
        path, tree = _sources()[name]
        top, local = _imports(tree)
        for node in [*top, *(n for _, n in local)]:
            if any(t == "pipeline.rl" or t.startswith("pipeline.rl.") for t in _targets(name, node)):
                direct.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not direct, f"pipeline.reward imports pipeline.rl at {direct}"
    through = {
        n: sorted(m for m in _closure(graph, n) if m == "pipeline.rl" or m.startswith("pipeline.rl.")) for n in reward
    }
    assert not any(through.values()), {n: ms for n, ms in through.items() if ms}


def test_no_implicit_reward_flag_is_consulted():
    """Which kind of reward model a folder holds is the scorer's business (``load_scorer``, ``scorer.kind``), not a
    duck-typed ``is_implicit_reward`` flag (``is_implicit_reward_dir``, a different name, stays)."""
    flag = re.compile(r"\bis_implicit_reward\b")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for d in ("pipeline", "stages")
        for p in sorted((ROOT / d).rglob("*.py"))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if flag.search(line)
    ]
    assert not hits, hits


def test_every_module_imports_in_a_fresh_interpreter():
    got = _imported()
    assert not got["failed"], "\n".join(f"{n}:\n{tb}" for n, tb in got["failed"].items())
    assert set(got["names"]) == set(_sources()) - {"pipeline"}  # the walk and the source files agree


def test_importing_the_reward_package_loads_no_rl_module():
    assert _imported()["rl_after_reward"] == []
