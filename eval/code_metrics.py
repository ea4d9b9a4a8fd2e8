"""Size and structure of the ``shift_edit`` package: the before/after numbers of the issue-19 and issue-31 refactors.

    python eval/code_metrics.py [--package shift_edit] [--json]

Prints: number of modules, total and largest module (lines), function-level imports, and the import circles among
the package's modules, counting module-level imports only, every import, and every import including type-only ones
(under ``if TYPE_CHECKING:``); the layer violations (a ground-floor module, :data:`FLOOR`, importing an upper one,
:data:`UPPER`); the largest file and the longest function, each with its exemption if it has one, and those over
the limits (:data:`MAX_FILE_LINES`, :data:`MAX_FUNCTION_LINES`) without one; private names ``eval/`` imports from
the package; and the pairs of duplicated blocks (the project's ``duplicates`` tool, when it is on PATH).

An **exemption** is a reason written where the size is: a comment ``# size: <reason>`` among a file's first
:data:`HEADER_LINES` lines, or ``# length: <reason>`` in the comment block right above a function (above its
decorators) or between its ``def`` line and the end of its docstring. A function's length leaves its docstring out.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]

#: the ground floor: subpackages (under the package) that import nothing from :data:`UPPER`
FLOOR = ("core", "model", "files")
UPPER = ("algorithms", "compat", "bench", "cli", "studies", "lens")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
HEADER_LINES = 40
_FILE_EXEMPTION = re.compile(r"#\s*size:\s*(\S.*)")
_FUNCTION_EXEMPTION = re.compile(r"#\s*length:\s*(\S.*)")


class ImportScan(NamedTuple):
    """The package's imports, read with ``ast`` (nothing is imported)."""

    modules: dict[str, Path]  # dotted module name -> file
    top: dict[str, set[str]]  # module-level imports between the package's modules
    every: dict[str, set[str]]  # the same, counting function-level imports too
    nested: list[tuple[str, int, list[str], str]]  # per function-level import: module, line, imported names, text
    typed: dict[str, set[str]]  # every import, type-only ones (under ``if TYPE_CHECKING``) included


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


def _imports(tree: ast.Module) -> tuple[list[ast.stmt], list[ast.stmt], list[ast.stmt]]:
    """(module-level imports, function-level imports, type-only imports under ``if TYPE_CHECKING``)."""
    top: list[ast.stmt] = []
    nested: list[ast.stmt] = []
    typed: list[ast.stmt] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            only = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (typed if only else nested if in_function else top).append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)), only)

    visit(tree, False, False)
    return top, nested, typed


def scan(package: Path) -> ImportScan:
    """Every import of every module of ``package`` (a package folder)."""
    modules = {_module_name(f, package): f for f in sorted(package.rglob("*.py"))}
    top_graph: dict[str, set[str]] = {n: set() for n in modules}
    all_graph: dict[str, set[str]] = {n: set() for n in modules}
    typed_graph: dict[str, set[str]] = {n: set() for n in modules}
    nested_imports: list[tuple[str, int, list[str], str]] = []
    for name, path in modules.items():
        top, nested, typed = _imports(ast.parse(path.read_text(encoding="utf-8")))
        is_package = path.name == "__init__.py"
        for node in top + nested + typed:
            resolved = _resolve(node, name, is_package, modules)
            targets = {t for t in resolved if t in modules and t != name}
            typed_graph[name] |= targets
            if node in typed:
                continue
            all_graph[name] |= targets
            if node in top:
                top_graph[name] |= targets
            else:
                nested_imports.append((name, node.lineno, resolved, ast.unparse(node)))
    return ImportScan(modules, top_graph, all_graph, nested_imports, typed_graph)


def layer_violations(found: ImportScan, package: str = "shift_edit") -> list[str]:
    """``"a -> b"`` for every import (type-only ones too) of an :data:`UPPER` module by a :data:`FLOOR` module."""
    floor = tuple(f"{package}.{f}" for f in FLOOR)
    upper = tuple(f"{package}.{u}" for u in UPPER)

    def within(m: str, prefixes: tuple[str, ...]) -> bool:
        return any(m == p or m.startswith(p + ".") for p in prefixes)

    return [f"{m} -> {t}" for m, targets in sorted(found.typed.items()) if within(m, floor)
            for t in sorted(targets) if within(t, upper)]


def _exemption(lines: list[str], start: int, end: int, pattern: re.Pattern) -> str | None:
    """The reason of the first ``pattern`` comment among ``lines[start:end]`` (0-based, end excluded), with the
    comment lines that continue it (indented further after the ``#``)."""
    for i in range(max(start, 0), min(end, len(lines))):
        m = pattern.search(lines[i])
        if m:
            reason = [m.group(1).strip()]
            for more in lines[i + 1:]:
                cont = re.match(r"\s*#\s{2,}(\S.*)", more)
                if not cont:
                    break
                reason.append(cont.group(1).strip())
            return " ".join(reason)
    return None


def sizes(modules: dict[str, Path]) -> tuple[list[dict], list[dict]]:
    """(files, functions): each with its name, lines and exemption (None without one), longest first.
    A function's lines run from its ``def`` (decorators excluded) to its last line, its docstring left out;
    nested functions count inside their parent and on their own."""
    files, functions = [], []
    for name, path in modules.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        files.append({"name": name, "lines": len(lines),
                      "exemption": _exemption(lines, 0, HEADER_LINES, _FILE_EXEMPTION)})
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                body = node.body[0]
                doc_end = body.end_lineno if isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant) \
                    else body.lineno - 1
                doc_lines = body.end_lineno - body.lineno + 1 if doc_end == body.end_lineno else 0
                above = first - 1  # the comment block right above the def (or its decorators)
                while above > 0 and lines[above - 1].lstrip().startswith("#"):
                    above -= 1
                functions.append({"name": f"{name}.{node.name}:{node.lineno}",
                                  "lines": node.end_lineno - node.lineno + 1 - doc_lines,
                                  "exemption": _exemption(lines, above, doc_end, _FUNCTION_EXEMPTION)})
    files.sort(key=lambda f: -f["lines"])
    functions.sort(key=lambda f: -f["lines"])
    return files, functions


def private_imports(folder: Path, package: str = "shift_edit") -> list[str]:
    """``"file:line name"`` for every private name (``_x``, or a module path with a ``_x`` part other than
    ``_version``) that the scripts under ``folder`` import from ``package``."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == package:
                parts = node.module.split(".")[1:]
                bad = [p for p in parts if p.startswith("_") and p != "_version"]
                bad += [a.name for a in node.names if a.name.startswith("_")]
                out += [f"{path.relative_to(folder.parent)}:{node.lineno} {b}" for b in bad]
    return out


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


def measure(package: Path, eval_dir: Path | None = None) -> dict:
    found = scan(package)
    files, functions = sizes(found.modules)
    return {
        "modules": len(found.modules),
        "lines": sum(f["lines"] for f in files),
        "largest": {"module": files[0]["name"], "lines": files[0]["lines"], "exemption": files[0]["exemption"]},
        "longest_function": functions[0],
        "files_over_limit": [f for f in files if f["lines"] > MAX_FILE_LINES and not f["exemption"]],
        "functions_over_limit": [f for f in functions if f["lines"] > MAX_FUNCTION_LINES and not f["exemption"]],
        "exemptions": [f for f in files + functions if f["exemption"]],
        "function_level_imports": len(found.nested),
        "function_level_import_list": [f"{m}:{line}: {text}" for m, line, _, text in found.nested],
        "circles_module_level": cycles(found.top),
        "circles_all_imports": cycles(found.every),
        "circles_with_type_only_imports": cycles(found.typed),
        "layer_violations": layer_violations(found, package.name),
        "eval_private_imports": private_imports(eval_dir) if eval_dir is not None and eval_dir.is_dir() else None,
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
    parser.add_argument("--eval", type=Path, default=ROOT / "eval", help="scripts that must use public names only")
    parser.add_argument("--json", action="store_true", help="everything as JSON (with the import list)")
    args = parser.parse_args()
    m = measure(args.package.resolve(), args.eval.resolve())
    if args.json:
        print(json.dumps(m, indent=1))
        return

    def why(entry: dict) -> str:
        return f" (exempt: {entry['exemption']})" if entry["exemption"] else ""

    fn = m["longest_function"]
    print(f"modules: {m['modules']}, lines: {m['lines']}")
    print(f"largest file: {m['largest']['module']} ({m['largest']['lines']} lines){why(m['largest'])}")
    print(f"longest function: {fn['name']} ({fn['lines']} lines){why(fn)}")
    print(f"files over {MAX_FILE_LINES} lines without an exemption: {len(m['files_over_limit'])} "
          f"{[(f['name'], f['lines']) for f in m['files_over_limit']]}")
    print(f"functions over {MAX_FUNCTION_LINES} lines without an exemption: {len(m['functions_over_limit'])} "
          f"{[(f['name'], f['lines']) for f in m['functions_over_limit']]}")
    print(f"exemptions: {len(m['exemptions'])}")
    for e in m["exemptions"]:
        print(f"  {e['name']} ({e['lines']} lines): {e['exemption']}")
    print(f"function-level imports: {m['function_level_imports']}")
    print(f"import circles (module-level imports): {len(m['circles_module_level'])} {m['circles_module_level']}")
    print(f"import circles (all imports): {len(m['circles_all_imports'])} {m['circles_all_imports']}")
    print(f"import circles (type-only imports too): {len(m['circles_with_type_only_imports'])} "
          f"{m['circles_with_type_only_imports']}")
    print(f"layer violations ({'/'.join(FLOOR)} importing {'/'.join(UPPER)}): {len(m['layer_violations'])} "
          f"{m['layer_violations']}")
    private = m["eval_private_imports"]
    print(f"private names imported by eval/: {'-' if private is None else len(private)} {private or ''}")
    print(f"duplicated blocks of >= 6 lines (duplicates tool, pairs): {m['duplicated_blocks']}")


if __name__ == "__main__":
    main()
