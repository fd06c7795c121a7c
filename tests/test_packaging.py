"""Packaging: installed, the toolkit is one import name, `bitfit`, whose parts come from the repository's
top-level folders (runtime/ -> bitfit.runtime, ...), and the runtime still loads without torch.

The wheel is built from this checkout and installed into a scratch directory, which is then imported from
a directory outside the repository, as a user's program would.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_no_torch import BLOCKER

REPO = Path(__file__).resolve().parents[1]
PARTS = ("runtime", "encoder", "compiler", "training", "exporters", "serve")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of this checkout, installed (without dependencies) into a directory of its own."""
    root = tmp_path_factory.mktemp("wheel")
    # built from a copy: a build writes build/ and *.egg-info into the tree it builds
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(root / "dist"), str(source)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = (root / "dist").glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(root / "site"), str(wheel)], check=True,
                   timeout=300, capture_output=True)
    return root


def test_the_wheel_holds_one_top_level_package(installed):
    (wheel,) = (installed / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"bitfit"}
    for module in ("runtime/session.py", "runtime/kinds.py", "encoder/biases.py", "compiler/verify.py",
                   "training/train.py", "exporters/bank.py", "serve/app.py", "serve/packdir.py", "cli.py"):
        assert f"bitfit/{module}" in names, module


def test_installed_imports_bitfit_only_and_no_torch(installed, tmp_path):
    code = BLOCKER + f"""
import importlib, json, sys
import bitfit, bitfit.runtime, bitfit.cli, bitfit.serve.packdir, bitfit.exporters
out = {{"bitfit": bitfit.__file__, "runtime": bitfit.runtime.__file__, "generic": {{}}}}
for name in {PARTS!r}:
    try:
        importlib.import_module(name)
        out["generic"][name] = "imported"
    except ImportError:
        out["generic"][name] = "absent"
out["torch"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(out))
"""
    env = {**os.environ, "PYTHONPATH": str(installed / "site")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    site = str(installed / "site")
    assert out["bitfit"].startswith(site) and out["runtime"].startswith(site)  # not this checkout
    assert out["generic"] == dict.fromkeys(PARTS, "absent")  # no `import runtime`, `import training`, ...
    assert out["torch"] == []
