"""Layering (docs/design.md#layers): which package may import which.

    jobs -> cluster -> generation, training -> evaluation -> synth, storage

synth and storage import neither each other nor Ray; generation, training and evaluation (the
job logic that runs in one process) never import Ray; cluster is the Ray layer, every module of
it about Ray.

The rules are checked on the source with `ast` (fast, nothing is imported), so they hold for every
code path, not only those a test runs; the promise that matters at run time (importing the science
does not start Ray) is also checked in a fresh interpreter.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = ("synth", "storage", "evaluation", "generation", "training", "cluster", "jobs")
OTHERS = {p: [f"cytosynth.{q}" for q in PACKAGES if q != p] for p in PACKAGES}  # "cytosynth.storage", ...
# What each package may import of the others: its layer and those below (docs/design.md#layers).
ALLOWED = {
    "synth": (),
    "storage": (),
    "evaluation": ("synth", "storage"),
    "generation": ("synth", "storage"),
    "training": ("evaluation", "synth", "storage"),
    "cluster": ("generation", "training", "evaluation", "synth", "storage"),
    "jobs": ("cluster", "generation", "training", "evaluation", "synth", "storage"),
}
# cluster's one module without Ray: how a job fails, which the CLI reads without loading Ray.
RAY_FREE_IN_CLUSTER = {"__init__.py", "failures.py"}


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to an absolute module name."""

    where: str  # "storage/shards.py:21"
    module: str  # "cytosynth.storage.job", "ray.data", "torch"
    names: tuple[str, ...]  # what `from module import ...` takes; () for `import module`
    at_import_time: bool  # runs when its module is imported (not inside a function or TYPE_CHECKING)

    def reaches(self, *roots: str) -> bool:
        """Whether it imports from a module under ``roots``; ``from cytosynth import storage``
        reaches ``cytosynth.storage``."""
        targets = [self.module, *(f"{self.module}.{name}" for name in self.names)]
        return any(t == root or t.startswith(root + ".") for t in targets for root in roots)


def package_dir(package: str) -> Path:
    """The source folder of ``cytosynth.<package>`` as Python finds it (imports only ``cytosynth``)."""
    spec = importlib.util.find_spec(f"cytosynth.{package}")
    assert spec is not None and spec.submodule_search_locations, f"cytosynth.{package} not found"
    return Path(next(iter(spec.submodule_search_locations)))


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, package: str, where: str) -> None:
        self.package, self.where, self.depth = package, where, 0  # depth: functions or TYPE_CHECKING
        self.found: list[Import] = []

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):  # read by type checkers only
            self._nested(node)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append(Import(f"{self.where}:{node.lineno}", alias.name, (), self.depth == 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # every package is one flat folder: level 1 is cytosynth.<package>, 2 is cytosynth
            base = ["cytosynth", self.package][: 3 - node.level]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        names = tuple(alias.name for alias in node.names)
        self.found.append(Import(f"{self.where}:{node.lineno}", module, names, self.depth == 0))


def imports_of(package: str) -> list[Import]:
    found = []
    for path in sorted(package_dir(package).glob("*.py")):
        collector = _ImportCollector(package, f"{package}/{path.name}")
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found += collector.found
    return found


def private_parts(imp: Import) -> list[str]:
    """The private names an import reaches: a module path part or an imported name with a leading
    underscore (dunders like ``__future__`` are public)."""
    parts = [*imp.module.split("."), *imp.names]
    return [p for p in parts if p.startswith("_") and not (p.startswith("__") and p.endswith("__"))]


def test_the_scan_sees_every_package_and_their_imports():
    """Guards the checks below against passing on nothing (a moved folder, a broken resolver)."""
    found = {package: imports_of(package) for package in PACKAGES}
    assert all(found.values()), {p: len(i) for p, i in found.items()}
    every = [imp for imports in found.values() for imp in imports]
    for root in ("cytosynth.storage", "cytosynth.synth", "cytosynth.generation.runner", "ray"):
        assert any(imp.reaches(root) for imp in every), root
    pipelines = [i for i in found["storage"] if i.module == "ray.data"]
    assert pipelines and not any(i.at_import_time for i in pipelines)  # inside a function, TYPE_CHECKING


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_packages_below_it(package):
    forbidden = [f"cytosynth.{q}" for q in PACKAGES if q != package and q not in ALLOWED[package]]
    bad = [imp for imp in imports_of(package) if imp.reaches(*forbidden)]
    assert not bad, bad


@pytest.mark.parametrize("package", ["synth", "evaluation", "generation", "training"])
def test_the_science_and_the_job_logic_never_import_ray(package):
    bad = [imp for imp in imports_of(package) if imp.reaches("ray")]
    assert not bad, bad


def test_storage_imports_ray_only_inside_functions():
    bad = [imp for imp in imports_of("storage") if imp.reaches("ray") and imp.at_import_time]
    assert not bad, bad


def test_every_cluster_module_but_the_failures_is_about_ray():
    """The layout tells the truth: job logic that needs no Ray lives in generation/training/evaluation."""
    ray_users = {imp.where.split(":")[0].split("/")[1] for imp in imports_of("cluster") if imp.reaches("ray")}
    modules = {path.name for path in package_dir("cluster").glob("*.py")}
    assert modules - RAY_FREE_IN_CLUSTER == ray_users, sorted(modules - RAY_FREE_IN_CLUSTER - ray_users)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_uses_another_package_only_through_public_names(package):
    """No ``from cytosynth.x._private import ...``, no ``from cytosynth.x.y import _name``."""
    bad = [(imp, private_parts(imp)) for imp in imports_of(package)
           if imp.reaches(*OTHERS[package]) and private_parts(imp)]
    assert not bad, bad


def test_jobs_read_no_private_attribute_of_an_imported_package():
    """``storage._helper`` is as private as ``from cytosynth.storage import _helper``."""
    bad = []
    for path in sorted(package_dir("jobs").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        packages = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "cytosynth" for alias in node.names}
        bad += [f"jobs/{path.name}:{node.lineno} {node.value.id}.{node.attr}" for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in packages and node.attr.startswith("_") and not node.attr.endswith("__")]
    assert not bad, bad


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_imports_a_private_name_of_another_module(package):
    bad = [(imp, private_parts(imp)) for imp in imports_of(package)
           if imp.reaches("cytosynth") and private_parts(imp)]
    assert not bad, bad


# ------------------------------------------------------------------ at run time, in a fresh interpreter

_PROBE = """
import json, sys
def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "deepspeed")
                  or (m.startswith("cytosynth.") and not m.startswith("cytosynth.synth")))
import cytosynth.synth
after_synth = loaded()
import cytosynth.jobs.cli
cytosynth.jobs.cli.build_parser()
print(json.dumps({"synth": after_synth, "cli": [m for m in loaded() if not m.startswith("cytosynth")]}))
"""


@pytest.fixture(scope="module")
def loaded_modules() -> dict[str, list[str]]:
    """What a fresh interpreter has loaded after ``import cytosynth.synth`` ("synth"), then after
    building the whole CLI parser ("cli": Ray and DeepSpeed modules only)."""
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_importing_synth_loads_neither_ray_nor_any_other_cytosynth_package(loaded_modules):
    assert loaded_modules["synth"] == []


@pytest.mark.slow
def test_the_cli_loads_ray_and_deepspeed_only_when_a_job_asks_for_them(loaded_modules):
    assert loaded_modules["cli"] == []
