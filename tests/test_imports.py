"""The package's import structure: no circles (counting function-level and type-only imports too), the layer
rule (the ground floor, ``core``/``model``/``files``, imports nothing from ``algorithms``, ``compat``, ``bench``,
``cli``, ``studies`` or ``lens``), no import inside a function except of an optional (or heavy, rarely needed)
dependency, and ``eval/`` scripts importing public names only.

Read from the source with ``ast`` (nothing is imported): an edge A -> B for each module-level
``import``/``from ... import`` in A naming package module B (``from .x import name`` counts as
an edge to ``.x.name`` when that is a module); imports under ``if TYPE_CHECKING:`` are annotations
only and are not edges. Circles are the strongly connected components of that graph.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "shift_edit"
EVAL = PKG.parent / "eval"

#: Modules a function may import: optional extras (the core runs without them) and heavy
#: dependencies only some calls need. ``transformers`` costs ~3 s to import on top of torch and only
#: loading a model needs it; ``fcntl`` exists on POSIX only (file locks of sequential runs).
OPTIONAL = {"matplotlib", "peft", "datasets", "nltk", "transformers", "fcntl"}


def _code_metrics():
    """``eval/code_metrics.py``: the one import scanner (the refactor report's numbers come from it too)."""
    spec = importlib.util.spec_from_file_location("code_metrics", EVAL / "code_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CM = _code_metrics()
_cycles = CM.cycles


def _scan():
    """``(module-level edges, [(module, line, imported module)] of function-level imports)``."""
    found = CM.scan(PKG)
    local = [(m, line, t) for m, line, targets, _ in found.nested for t in targets]
    return found.top, local


def test_the_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    edges, _ = _scan()
    assert _cycles(edges) == []


def test_no_import_circles_counting_function_level_and_type_only_imports():
    found = CM.scan(PKG)
    assert _cycles(found.every) == []
    assert _cycles(found.typed) == [], "a circle through imports under `if TYPE_CHECKING:`"


def test_the_ground_floor_imports_no_upper_floor():
    assert CM.layer_violations(CM.scan(PKG)) == []


def test_the_layer_check_sees_a_violation(tmp_path):
    pkg = tmp_path / "shift_edit"
    for sub in ("core", "bench"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "bench" / "runner.py").write_text("X = 1\n")
    (pkg / "core" / "editing.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                             "    from ..bench.runner import X\n")
    assert CM.layer_violations(CM.scan(pkg)) == ["shift_edit.core.editing -> shift_edit.bench.runner"]


def test_eval_scripts_import_public_names_only():
    assert CM.private_imports(EVAL) == [], "make the name public in the library, or change the script"


def test_the_scan_sees_the_package():
    edges, local = _scan()
    assert "shift_edit.files.patch" in edges and "shift_edit.core.result" in edges["shift_edit.files.patch"]
    assert any(m == "shift_edit.files.lora" and t == "peft" for m, _, t in local)  # an optional import is found


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
    from shift_edit.files.data_files import find_file

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.json").write_text("[]")
    monkeypatch.setenv("SHIFT_EDIT_DATA", str(tmp_path))
    assert find_file("sub/x.json") == tmp_path / "sub" / "x.json"
    assert find_file("sub/missing.json") is None


def test_bench_and_cli_name_no_algorithm():
    """The registry is the only list of algorithms: no string in ``bench/`` or ``cli/`` code is an algorithm's name
    (protocols and file formats named after a paper, e.g. "ROME's generation protocol", are longer strings)."""
    import ast

    from shift_edit.core.registry import algorithm_names

    names = set(algorithm_names())
    found = []
    for sub in ("bench", "cli"):
        for path in sorted((PKG / sub).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value in names:
                    found.append(f"{path.relative_to(PKG)}:{node.lineno} {node.value!r}")
    assert found == [], "read the algorithm facts from the registry"


def test_every_package_name_eval_imports_exists():
    """Every ``from shift_edit... import name`` in ``eval/`` (function-level ones included) names a module or an
    attribute that exists: a module move must update the scripts too."""
    import ast
    import importlib

    missing = []
    for path in sorted(EVAL.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shift_edit")):
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                missing.append(f"{path.name}: {node.module}")
                continue
            for alias in node.names:
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                    missing.append(f"{path.name}: {node.module}.{alias.name}")
    assert missing == []
