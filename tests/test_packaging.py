"""The package builds as a wheel that installs into a fresh environment and works from there.

The wheel is built from a copy of the source (nothing is written into the checkout), with
the setuptools already installed (``--no-build-isolation``, no download), and installed
without dependencies into a new virtual environment that sees this environment's torch and
Lightning through a path entry only, so that the editable install of the checkout is not
on its path: ``lightning_kfac`` must come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import importlib.metadata as metadata, json, pathlib, sys
import lightning_kfac
from lightning_kfac import KFACCallback, KFACDDPStrategy
KFACCallback(damping=0.05, progress_bar=["damping"])
package = pathlib.Path(lightning_kfac.__file__).parent
meta = metadata.metadata("lightning-kfac")
print(json.dumps({
    "file": lightning_kfac.__file__,
    "prefix": sys.prefix,
    "py_typed": (package / "py.typed").is_file(),
    "version": lightning_kfac.__version__,
    "author": meta.get("Author"),
    "classifiers": meta.get_all("Classifier"),
    "license": meta.get("License-Expression"),
    "license_files": meta.get_all("License-File"),
}))
"""


def run(*command: str | Path, cwd: Path, timeout: int = 120) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "lightning_kfac",
        source / "lightning_kfac",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    dist = tmp_path_factory.mktemp("dist")
    run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "--wheel-dir", dist, source, cwd=source,
    )  # fmt: skip
    (built,) = dist.glob("lightning_kfac-*.whl")
    return built


def test_wheel_ships_py_typed_and_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_kfac/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/", "docs/")) for n in names)


def test_wheel_installs_into_a_fresh_venv_and_imports_from_there(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).strip()
    )
    # torch and Lightning from this environment, as plain path entries: its .pth files (the
    # editable install of the checkout among them) are not processed there.
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "outer_environment.pth").write_text("\n".join(sorted(outer)) + "\n")
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        wheel, cwd=tmp_path,
    )  # fmt: skip
    found = json.loads(run(python, "-c", CHECK, cwd=tmp_path, timeout=300).strip().splitlines()[-1])
    assert Path(found["file"]).resolve().is_relative_to(venv.resolve()), found["file"]
    assert not Path(found["file"]).resolve().is_relative_to(ROOT), found["file"]
    assert found["py_typed"]
    assert found["author"] and found["license"] == "Apache-2.0"
    assert found["license_files"] == ["LICENSE"]
    assert "Typing :: Typed" in found["classifiers"]
