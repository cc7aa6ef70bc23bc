"""The repository's layout, read from the source: who may import whom (function-level imports included), no import
cycles in the library, and what pyproject.toml installs.

    models.py     the networks: stdlib, torch and timm only
    diffusion/    the math: nothing of ours (relative imports among its own modules)
    fpdm/         the library the scripts share: models, diffusion and fpdm
    train.py ...  the scripts at the top, run as files: models, diffusion and fpdm, never another script
    bench/, experiments/   nobody imports them (an experiment imports experiments/common.py)
    tests/        anything
"""

import ast
import graphlib
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("models", "diffusion", "fpdm")  # what pyproject.toml installs
# The generic top-level names the library had before it became fpdm/: an import of one is a stale import (it would
# find another installed package of that name, e.g. Hugging Face's `evaluate`, or nothing).
RETIRED = {"configs": "fpdm.config", "fp_diagnostics": "fpdm.diagnostics", **{name: f"fpdm.{name}" for name in (
    "cli", "sampling", "allocation", "checkpoints", "diffusers_dit", "data", "vae", "run_folders", "measure")}}
THIRD_PARTY_IN_MODELS = ("torch", "timm")
SKIP = (".venv", ".git", "results", "__pycache__")


def python_files():
    """Every .py file of the repository, relative to its root."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(folder, name), ROOT)


def module_name(path):
    """'fpdm/sampling.py' -> 'fpdm.sampling', 'diffusion/__init__.py' -> 'diffusion', 'train.py' -> 'train'."""
    parts = path[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kind(path):
    """models, diffusion, fpdm, script, bench, experiments or tests."""
    top = path.split(os.sep)[0]
    if path == "models.py":
        return "models"
    if top in ("diffusion", "fpdm", "bench", "experiments", "tests"):
        return top
    if os.sep not in path:
        return "script"
    return "other"


def imports(path):
    """The absolute module names `path` imports anywhere (module level, functions, methods), relative imports
    resolved against its package, with the line of each."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read(), path)
    package = module_name(path) if path.endswith("__init__.py") else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, node.lineno))
            # `from fpdm import sampling` imports the module fpdm.sampling: the graph needs that edge
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


FILES = list(python_files())
MODULES = {module_name(path): path for path in FILES}
SCRIPTS = {module_name(path) for path in FILES if kind(path) == "script"}


def ours(name, importer=None):
    """The file of ours that `name` refers to (a module, or a name inside a module of ours), else None. A file of
    bench/, experiments/ or tests/ runs with its own folder first on sys.path: `import common` there is its sibling."""
    folder = importer.split(os.sep)[0] if importer and os.sep in importer else None
    for candidate in ([f"{folder}.{name}"] if folder in ("bench", "experiments", "tests") else []) + [name]:
        while candidate:
            if candidate in MODULES:
                return MODULES[candidate]
            candidate = candidate.rpartition(".")[0]
    return None


def is_stdlib(name):
    return name.split(".")[0] in sys.stdlib_module_names


def allowed(importer, name):
    """Whether the file `importer` may import module `name`; None when it may, else why not."""
    target = ours(name, importer)
    what = kind(importer)
    if target is None and name.split(".")[0] in RETIRED:
        return f"{name.split('.')[0]} is {RETIRED[name.split('.')[0]]} now (fpdm/__init__.py lists the modules)"
    if target is None:  # a third-party or stdlib module
        if what == "models" and not is_stdlib(name) and name.split(".")[0] not in THIRD_PARTY_IN_MODELS:
            return "models.py imports only the standard library, torch and timm"
        return None
    target_kind = kind(target)
    if what == "tests":
        return None
    if target_kind in ("bench", "experiments"):
        own_helpers = what == target_kind and (what == "bench" or target == os.path.join("experiments", "common.py"))
        if not own_helpers:
            return f"nothing imports {target_kind}/ (an experiment imports experiments/common.py, bench/ its own)"
    if what == "models" and target != importer:
        return "models.py imports nothing of ours"
    if what == "diffusion" and target_kind != "diffusion":
        return "diffusion/ imports nothing of ours"
    if what in ("fpdm", "script") and target_kind not in LIBRARY:
        return f"{'fpdm/' if what == 'fpdm' else 'a script'} imports only models, diffusion and fpdm"
    return None


def test_every_kind_of_file_is_classified():
    kinds = {kind(path) for path in FILES}
    assert "other" not in kinds, [path for path in FILES if kind(path) == "other"]
    assert {"models", "diffusion", "fpdm", "script", "bench", "experiments", "tests"} <= kinds
    assert {"train", "sample", "sample_ddp", "evaluate", "extract_features", "export", "invert", "demo"} <= SCRIPTS


@pytest.mark.parametrize("path", FILES)
def test_imports_follow_the_layout(path):
    wrong = [f"{path}:{line} imports {name}: {why}" for name, line in imports(path)
             if (why := allowed(path, name)) is not None]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_in_the_library():
    """The graph of models, diffusion/ and fpdm/ (every import, function-level ones too) has no cycle: each module can
    be read, tested and imported after the ones it uses."""
    graph = {}
    for name, path in MODULES.items():
        if kind(path) in LIBRARY:
            graph[name] = {module_name(target) for imported, _ in imports(path)
                           if (target := ours(imported)) is not None and target != path}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")
    assert {"models", "diffusion", "fpdm", "fpdm.sampling", "fpdm.training"} <= set(order)


def test_importing_the_package_is_light():
    """`import fpdm` loads no module of its own and no torch: fpdm/__init__.py is the map, not a re-export."""
    code = "import sys, fpdm; print(sorted(m for m in sys.modules if m.startswith(('fpdm.', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pyproject_installs_the_library_only():
    """Three names in site-packages: models, diffusion and fpdm (no generic module names, no scripts)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert setuptools["py-modules"] == ["models"]
    assert sorted(setuptools["packages"]) == ["diffusion", "fpdm"]
    for package in setuptools["packages"]:
        assert os.path.isfile(os.path.join(ROOT, package, "__init__.py")), package
    top = {module_name(path) for path in FILES if os.sep not in path}
    assert top - SCRIPTS == {"models"}
