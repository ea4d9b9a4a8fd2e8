"""Size and structure of the ``shift_edit`` package: the before/after numbers of the issue-19 refactor.

    python eval/code_metrics.py [--package shift_edit] [--json]

Prints: number of modules, total and largest module (lines), function-level imports (all, and those of modules
outside the package's core dependencies), and the import circles among the package's modules, once counting only
module-level imports and once counting every import (a circle that exists only in the second graph is hidden by
function-level imports). Duplicated blocks are counted with the project's ``duplicates`` tool when it is on PATH.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class ImportScan(NamedTuple):
    """The package's imports, read with ``ast`` (nothing is imported)."""

    modules: dict[str, Path]  # dotted module name -> file
    top: dict[str, set[str]]  # module-level imports between the package's modules
    every: dict[str, set[str]]  # the same, counting function-level imports too
    nested: list[tuple[str, int, list[str], str]]  # per function-level import: module, line, imported names, text


def _module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom | ast.Import, module: str, is_package: bool, modules: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # `from . import x` names a submodule when there is one (the package itself is not what it needs)
    return [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix for alias in node.names]


def _imports(tree: ast.Module) -> tuple[list[ast.stmt], list[ast.stmt]]:
    """(module-level imports, function-level imports); ``if TYPE_CHECKING`` blocks are neither."""
    top: list[ast.stmt] = []
    nested: list[ast.stmt] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (nested if in_function else top).append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, nested


def scan(package: Path) -> ImportScan:
    """Every import of every module of ``package`` (a package folder)."""
    modules = {_module_name(f, package): f for f in sorted(package.rglob("*.py"))}
    top_graph: dict[str, set[str]] = {n: set() for n in modules}
    all_graph: dict[str, set[str]] = {n: set() for n in modules}
    nested_imports: list[tuple[str, int, list[str], str]] = []
    for name, path in modules.items():
        top, nested = _imports(ast.parse(path.read_text(encoding="utf-8")))
        is_package = path.name == "__init__.py"
        for node in top + nested:
            resolved = _resolve(node, name, is_package, modules)
            targets = {t for t in resolved if t in modules and t != name}
            all_graph[name] |= targets
            if node in top:
                top_graph[name] |= targets
            else:
                nested_imports.append((name, node.lineno, resolved, ast.unparse(node)))
    return ImportScan(modules, top_graph, all_graph, nested_imports)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def measure(package: Path) -> dict:
    found = scan(package)
    lines = {n: len(f.read_text().splitlines()) for n, f in found.modules.items()}
    largest = max(lines, key=lines.get)
    return {
        "modules": len(found.modules),
        "lines": sum(lines.values()),
        "largest": {"module": largest, "lines": lines[largest]},
        "function_level_imports": len(found.nested),
        "function_level_import_list": [f"{m}:{line}: {text}" for m, line, _, text in found.nested],
        "circles_module_level": cycles(found.top),
        "circles_all_imports": cycles(found.every),
        "duplicated_blocks": _duplicates(package),
    }


def _duplicates(package: Path) -> int | None:
    tool = shutil.which("duplicates")
    if tool is None:
        return None
    text = subprocess.run([tool, "--repo", str(package), "--most", "200", "--seconds", "120"],
                          capture_output=True, text=True, check=False).stdout
    return sum(1 for line in text.splitlines() if line.startswith("D") and line[1:2].isdigit())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, default=ROOT / "shift_edit")
    parser.add_argument("--json", action="store_true", help="everything as JSON (with the import list)")
    args = parser.parse_args()
    m = measure(args.package.resolve())
    if args.json:
        print(json.dumps(m, indent=1))
        return
    print(f"modules: {m['modules']}, lines: {m['lines']}, largest: {m['largest']['module']} "
          f"({m['largest']['lines']} lines)")
    print(f"function-level imports: {m['function_level_imports']}")
    print(f"import circles (module-level imports): {len(m['circles_module_level'])} {m['circles_module_level']}")
    print(f"import circles (all imports): {len(m['circles_all_imports'])} {m['circles_all_imports']}")
    print(f"duplicated blocks of >= 6 lines (duplicates tool): {m['duplicated_blocks']}")


if __name__ == "__main__":
    main()
