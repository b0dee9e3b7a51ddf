"""The floors of the code base, read from its imports (every `import` in a file, inside functions included).

A package may import only packages of a lower floor; two packages of the same floor import neither each other.
So no two top-level packages import each other, directly or round a loop, and the low floors never load
Lightning modules, callbacks or the study.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)

# floor -> packages on it; each may import only those on lower floors
FLOORS = (
    ("user_errors",),  # the one base class of every mistake a user can fix
    ("quantizers",),  # plain PyTorch fake quantization and the method registry
    ("records",),  # a run's files, the results store, the paper's measures and mechanism estimators
    ("datamodules",),
    ("lightning_modules",),
    ("callbacks",),
    ("study", "deploy"),
    ("app",),  # the Lightning CLI, the run folder, the checks before a run, signals and the error path
    ("cli",),
)
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}
NOT_PACKAGES = {"tests", "benchmarks", "scripts", "configs", "docs", "runs"}
# Lightning itself stays out of these floors (the offline report must not need it to read JSON lines).
NO_LIGHTNING = ("user_errors", "quantizers", "records")


def top_level_packages() -> set[str]:
    found = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name not in NOT_PACKAGES}
    return found | {p.stem for p in REPO.glob("*.py")}


def imports(path: Path) -> set[str]:
    """Top-level names every import statement of the file reaches (absolute imports; relative ones stay inside)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _project_files():
    """Every .py file of the project: hidden folders (.venv, .git) and run outputs are never walked."""
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in ("runs", "wandb", "__pycache__")]
        yield from (Path(folder) / name for name in files if name.endswith(".py"))


def package_imports() -> dict[str, dict[str, set[str]]]:
    """{package: {imported package of ours: {files importing it}}}; also every third-party top-level name."""
    ours = top_level_packages()
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in _project_files():
        relative = path.relative_to(REPO)
        package = relative.parts[0].removesuffix(".py")
        if package not in ours:
            continue
        for name in imports(path):
            if name != package and (name in ours or name in ("lightning", "pytorch_lightning")):
                graph[package][name].add(str(relative))
    return graph


def test_every_package_has_a_floor():
    missing = sorted(top_level_packages() - set(FLOOR))
    assert not missing, f"give these top-level packages a floor in FLOORS: {missing}"


def test_packages_import_only_lower_floors():
    wrong = []
    for package, targets in package_imports().items():
        for target, files in targets.items():
            if target in FLOOR and FLOOR[target] >= FLOOR[package]:
                wrong.append(f"{package} -> {target} ({', '.join(sorted(files))})")
    assert not wrong, "imports against the floors:\n" + "\n".join(sorted(wrong))


def test_low_floors_do_not_import_lightning():
    graph = package_imports()
    wrong = {p: sorted(graph[p][lib]) for p in NO_LIGHTNING for lib in ("lightning", "pytorch_lightning")
             if graph[p].get(lib)}
    assert not wrong, f"Lightning imported by a low floor: {wrong}"


def test_the_checker_sees_function_level_imports(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("import os\n\ndef late():\n    from callbacks.results import ResultsCallback\n"
                      "    import study.report\n")
    assert imports(source) == {"os", "callbacks", "study"}


def test_no_test_module_imports_another():
    """Shared helpers live in conftest.py (or a helper module not named test_*): a test module imported by another
    runs its module-level code twice and couples two files' fixtures."""
    wrong = {}
    for path in (REPO / "tests").glob("*.py"):
        tests_imported = sorted(name for name in imports(path) if name.startswith("test_"))
        if tests_imported:
            wrong[path.name] = tests_imported
    assert not wrong, f"test modules importing other test modules: {wrong}"


def test_the_unit_tier_guard_refuses_a_process_and_a_fit():
    """This module is in the unit tier: the conftest guard is active here, and must refuse both."""
    import subprocess

    from lightning.pytorch import Trainer

    from conftest import UnitTierViolation

    with pytest.raises(UnitTierViolation, match="start a process"):
        subprocess.run(["true"], check=False)
    with pytest.raises(UnitTierViolation, match="fit through Lightning"):
        Trainer.fit(None, None)
