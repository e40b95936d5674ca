"""The package layout's rules (``../shared/DESIGN.md`` section 2), checked by parsing imports.

Data flows one way: raw dataset -> ``data_prep`` -> ``mink_ssl.formats`` -> ``mink_ssl.data`` ->
model -> objective -> trainer. These tests read every module's import statements (top-level
and function-local) with :mod:`ast`, so a rule broken inside a function is caught too.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import statement in ``path``;
    relative imports are resolved against the module's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            # "from pkg import mod" imports the submodule pkg.mod where one exists
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    ROOT / Path(*sub.split(".")) / "__init__.py").is_file()
                found.append((sub if is_module else module, node.lineno, id(node) in top_level))
    return found


def modules_under(package: str) -> list[Path]:
    return sorted((ROOT / Path(*package.split("."))).rglob("*.py"))


def violations(package: str, forbidden: tuple[str, ...], top_level_only: bool = False) -> list[str]:
    bad = []
    for path in modules_under(package):
        for module, line, top in imports_of(path):
            if top_level_only and not top:
                continue
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


def test_the_import_parser_sees_local_relative_and_submodule_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "a.py", "sub/__init__.py", "sub/b.py"):
        (pkg / f).write_text("")
    (pkg / "sub" / "c.py").write_text(
        "import os\nfrom . import b\nfrom ..a import thing\n\ndef f():\n    from pkg import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imports_of(pkg / "sub" / "c.py") == [
        ("os", 1, True), ("pkg.sub.b", 2, True), ("pkg.a", 3, True), ("pkg.a", 6, False)]


def test_data_prep_imports_only_formats_and_pure_helpers_of_the_library():
    assert violations("data_prep", ("mink_ssl.data", "mink_ssl.engine", "mink_ssl.models",
                                    "mink_ssl.objectives", "mink_ssl.tasks", "mink_ssl.eval",
                                    "mink_ssl.tools", "torch", "MinkowskiEngine")) == []


def test_formats_need_neither_torch_nor_minkowski_engine_at_import():
    assert violations("mink_ssl.formats", ("torch", "MinkowskiEngine"), top_level_only=True) == []
    assert violations("mink_ssl.formats", ("mink_ssl.data", "mink_ssl.engine", "mink_ssl.models",
                                           "mink_ssl.objectives", "mink_ssl.tasks",
                                           "mink_ssl.eval", "mink_ssl.tools", "data_prep")) == []


def test_eval_is_pure_metrics_and_reports():
    assert violations("mink_ssl.eval", ("mink_ssl.models", "mink_ssl.data", "mink_ssl.tasks",
                                        "mink_ssl.engine", "mink_ssl.objectives",
                                        "mink_ssl.tools", "MinkowskiEngine")) == []


def test_engine_is_the_generic_core_and_imports_no_task():
    """The trainer knows no task and no objective (objectives plug into pretraining with the
    engine's hook interface)."""
    assert violations("mink_ssl.engine", ("mink_ssl.tasks", "mink_ssl.tools", "mink_ssl.cli",
                                          "mink_ssl.eval", "mink_ssl.objectives",
                                          "data_prep")) == []


def test_only_models_engines_imports_a_sparse_engine():
    """No engine type leaks above mink_ssl.models: the engines' packages are imported only in
    mink_ssl/models/engines (everything else sees SparseVoxels and dense tensors)."""
    for package in ("mink_ssl", "data_prep"):
        bad = [v for v in violations(package, ("MinkowskiEngine", "spconv", "spconv_triton"))
               if not v.startswith("mink_ssl/models/engines/")]
        assert bad == []


def test_ops_and_models_import_no_metrics_and_no_training():
    for package in ("mink_ssl.ops", "mink_ssl.models", "mink_ssl.data"):
        assert violations(package, ("mink_ssl.eval", "mink_ssl.tasks", "mink_ssl.engine",
                                    "mink_ssl.tools", "mink_ssl.cli")) == []


def test_applications_sit_on_top():
    """Only the command-line entry points use the tools; nothing in the library (below tasks)
    imports a task, the tools or data_prep."""
    for package in ("mink_ssl.engine", "mink_ssl.tasks", "mink_ssl.models", "mink_ssl.data",
                    "mink_ssl.objectives", "mink_ssl.ops", "mink_ssl.eval", "mink_ssl.formats"):
        assert violations(package, ("mink_ssl.tools", "mink_ssl.cli")) == []
    for package in ("mink_ssl.models", "mink_ssl.data", "mink_ssl.objectives", "mink_ssl.ops",
                    "mink_ssl.eval", "mink_ssl.formats"):
        assert violations(package, ("mink_ssl.tasks", "data_prep")) == []


def code_files() -> list[Path]:
    found = [ROOT / "setup.py"]
    for folder in ("mink_ssl", "data_prep", "scripts", "benchmarks", "experiments", "docker"):
        found += sorted((ROOT / folder).rglob("*.py"))
    return found


def test_no_code_file_is_longer_than_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in code_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by responsibility: {long}"


#: the library's packages from the bottom up: each imports only the ones before it (and the
#: base modules at the top of mink_ssl/: sparse, io, errors, locks, signals, geometry, seeding, registry)
LAYERS = ("formats", "data", "ops", "models", "eval", "engine", "objectives", "tasks", "tools",
          "cli")


def test_packages_import_only_the_layers_below_them():
    for k, package in enumerate(LAYERS):
        above = tuple(f"mink_ssl.{p}" for p in LAYERS[k + 1:])
        assert violations(f"mink_ssl.{package}", above) == [], package
    assert sorted(p.name for p in (ROOT / "mink_ssl").iterdir()
                  if p.is_dir() and (p / "__init__.py").is_file()) == sorted(LAYERS)
    base = [p for p in (ROOT / "mink_ssl").glob("*.py") if p.name != "__init__.py"]
    for path in base:  # the base modules import no package of the library
        bad = [m for m, _, _ in imports_of(path)
               if m.startswith("mink_ssl.") and m.split(".")[1] in LAYERS]
        assert bad == [], path.name


def test_no_test_file_imports_from_conftest():
    """Shared helpers come from tests/helpers.py; conftest.py holds fixtures only."""
    bad = [f"{p.name}:{line}" for p in sorted((ROOT / "tests").glob("*.py"))
           for module, line, _ in imports_of(p) if module == "conftest"]
    assert bad == []
