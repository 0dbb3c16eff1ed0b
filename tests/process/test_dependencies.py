"""The package's declared dependencies against what it imports, what pip sees, and what a core-only install does.

- Every third-party module clipkit's code imports comes from a distribution that setup.py declares, in
  install_requires or in the extra that clipkit.extras names for it.
- The environment the README's commands build passes `pip check`.
- With every optional part missing (a core-only install), every clipkit module still imports, and each command
  that needs an extra stops with one line naming that extra.
"""
from __future__ import annotations

import ast
import json
import re
import runpy
import subprocess
import sys
from importlib import metadata

from clipkit.extras import EXTRA_OF_MODULE

from helpers import ROOT
PACKAGE = ROOT / "clipkit"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _setup_arguments() -> dict:
    """The keyword arguments setup.py gives setuptools (read from the file under test, not from an install's
    metadata, which may be another checkout's)."""
    import setuptools

    captured: dict = {}
    real = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = real
    return captured


def _declared() -> dict[str, set[str]]:
    """distribution -> the extras that declare it ('' for install_requires), as setup.py says."""
    args = _setup_arguments()
    declared: dict[str, set[str]] = {}
    groups = {"": args["install_requires"], **args["extras_require"]}
    for extra, reqs in groups.items():
        for req in reqs:
            name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
            declared.setdefault(_canonical(name), set()).add(extra)
    return declared


def _imported_modules() -> dict[str, list[str]]:
    """top-level third-party module -> the files of clipkit that import it."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "clipkit" and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_imported_module_is_declared():
    declared = _declared()
    providers = metadata.packages_distributions()
    undeclared = {}
    for module, files in _imported_modules().items():
        dists = {_canonical(d) for d in providers.get(module, [])}
        assert dists, f"{module} (imported by {files[0]}) is not installed, so nothing provides it"
        extras = set().union(*(declared.get(d, set()) for d in dists))
        wanted = {EXTRA_OF_MODULE[module]} if module in EXTRA_OF_MODULE else {""}
        # A module may also be declared at a wider level (the core, or the test extra for the benches' peers).
        if not extras & (wanted | {""}) and not (module not in EXTRA_OF_MODULE and extras & {"bench", "test"}):
            undeclared[module] = (sorted(dists), sorted(extras), files[0])
    assert not undeclared, f"imported but not declared where clipkit.extras says (module: dists, extras, file): {undeclared}"


def test_extras_table_matches_setup():
    declared = _declared()
    providers = metadata.packages_distributions()
    for module, extra in EXTRA_OF_MODULE.items():
        dists = {_canonical(d) for d in providers.get(module, [])}
        assert any(extra in declared.get(d, set()) for d in dists), (module, extra, dists)
        assert any("all" in declared.get(d, set()) for d in dists), (module, "all")
        # and the optional parts are not pulled in by the core install
        assert not any("" in declared.get(d, set()) for d in dists), f"{module} is in install_requires"


def test_environment_passes_pip_check():
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


# Runs in a fresh interpreter: every optional module made unimportable, as in an install without the extras.
CORE_ONLY = r'''
import contextlib, importlib, io, json, pkgutil, sys
for module in sys.argv[1].split(","):
    sys.modules[module] = None
import clipkit
from clipkit.cli import main
failed = {}
for info in pkgutil.walk_packages(clipkit.__path__, "clipkit."):
    if info.name == "clipkit.__main__":  # runs the command line on import
        continue
    try:
        importlib.import_module(info.name)
    except Exception as e:
        failed[info.name] = repr(e)
results = {}
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results[" ".join(argv)] = [code, err.getvalue()]
print(json.dumps({"import_failures": failed, "commands": results}))
'''


def test_core_only_install_imports_and_names_the_missing_extra(tmp_path):
    out = tmp_path / "out"
    for name in ("ck", "task", "emb", "idx"):  # the paths exist; the missing extra is what stops each command
        (tmp_path / name).mkdir()
    commands = {
        "deepspeed": ["train", f"run.dir={tmp_path / 'run'}", "deepspeed.enabled=true"],
        "onnx": ["train", f"run.dir={tmp_path / 'run'}", "export.format=onnx"],
        "lora": ["finetune", "--checkpoint", str(tmp_path / "ck"), "--data", str(tmp_path / "task"),
                 "--method", "lora", "--out", str(out / "lora")],
        "retrieval": ["index", "--embeddings", str(tmp_path / "emb"), "--out", str(out / "idx")],
        "retrieval-serve": ["serve", "--index", str(tmp_path / "idx")],
    }
    done = subprocess.run([sys.executable, "-c", CORE_ONLY, ",".join(EXTRA_OF_MODULE), json.dumps(list(commands.values()))],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["import_failures"] == {}
    for extra, argv in commands.items():
        code, err = report["commands"][" ".join(argv)]
        extra = extra.split("-")[0]
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (argv, code, err)
        assert f"pip install 'clipkit[{extra}]'" in lines[0], lines[0]
    assert not (tmp_path / "run").exists() and not out.exists()  # refused before anything was written
