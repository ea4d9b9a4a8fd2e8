"""The package's import structure: no circles among module-level imports, and no import inside a
function except of an optional (or heavy, rarely needed) dependency.

Read from the source with ``ast`` (nothing is imported): an edge A -> B for each module-level
``import``/``from ... import`` in A naming package module B (``from .x import name`` counts as
an edge to ``.x.name`` when that is a module); imports under ``if TYPE_CHECKING:`` are annotations
only and are not edges. Circles are the strongly connected components of that graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "shift_edit"

#: Modules a function may import: optional extras (the core runs without them) and heavy
#: dependencies only some calls need. ``transformers`` costs ~3 s to import on top of torch and only
#: loading a model needs it; ``fcntl`` exists on POSIX only (file locks of sequential runs).
OPTIONAL = {"matplotlib", "peft", "datasets", "nltk", "transformers", "fcntl"}

def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool, modules) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]


def _scan():
    """``(module-level edges, [(module, line, imported module)] of function-level imports)``."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    local: list[tuple[str, int, str]] = []

    for module, (path, is_pkg) in modules.items():
        def walk(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    walk(child, True)
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(child, module, is_pkg, modules):
                        if in_function:
                            local.append((module, child.lineno, target))
                        elif target in modules and target != module:
                            edges[module].add(target)
                walk(child, in_function)

        walk(ast.parse(path.read_text(encoding="utf-8")), False)
    return edges, local


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    edges, _ = _scan()
    assert _cycles(edges) == []


def test_the_scan_sees_the_package():
    edges, local = _scan()
    assert "shift_edit.patch" in edges and "shift_edit.result" in edges["shift_edit.patch"]
    assert any(m == "shift_edit.lora" and t == "peft" for m, _, t in local)  # an optional import is found


def test_function_level_imports_are_of_optional_modules_only():
    _, local = _scan()
    bad = [f"{m}:{line} imports {t}" for m, line, t in local
           if t.split(".")[0] not in OPTIONAL]
    assert bad == [], "import these at module level (only optional or heavy dependencies may be imported lazily)"


def test_modules_take_the_version_from_the_version_module():
    edges, local = _scan()
    importers = sorted({m for m, targets in edges.items() if "shift_edit" in targets}
                       | {m for m, _, t in local if t == "shift_edit"})
    assert importers == [], "import __version__ from shift_edit._version, not the package"


def test_a_missing_optional_dependency_is_one_line_naming_its_extra(monkeypatch, capsys):
    from shift_edit import cli
    from shift_edit.cli import models

    def needs_matplotlib(args):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(models, "run", needs_matplotlib)
    assert cli.main(["models"]) == 2
    assert "pip install 'shift_edit[plot]'" in capsys.readouterr().err

    def needs_something_else(args):
        raise ModuleNotFoundError("No module named 'nope'", name="nope")

    monkeypatch.setattr(models, "run", needs_something_else)
    assert cli.main(["models"]) == 1  # not an extra: an internal error, as before
    assert "internal error" in capsys.readouterr().err


def test_find_file_looks_in_the_data_folders(monkeypatch, tmp_path):
    from shift_edit.data import find_file

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.json").write_text("[]")
    monkeypatch.setenv("SHIFT_EDIT_DATA", str(tmp_path))
    assert find_file("sub/x.json") == tmp_path / "sub" / "x.json"
    assert find_file("sub/missing.json") is None
