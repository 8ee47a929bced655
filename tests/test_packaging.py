"""``pip install .`` (a wheel, not a checkout): the console scripts run and the shipped configs
come with the package."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_installs_and_its_commands_run_outside_the_checkout(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(dist), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("raypipe-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "raypipe/configs/default.yaml" in names and "raypipe/configs/flowers.yaml" in names
    assert not any(n.startswith(("tests/", "jobs/")) for n in names)

    venv = tmp_path / "venv"
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the installed wheel
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # the dependencies (several GB) from this environment's site-packages, as plain paths: its
    # .pth files, the editable install of this checkout among them, are not read
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300, env=clean)
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "import raypipe; print(raypipe.__file__)"],
                           cwd=elsewhere, env=clean, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    help_ = subprocess.run([str(venv / "bin" / "raypipe-train"), "--help"], cwd=elsewhere,
                           env=clean, capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0, help_.stderr[-3000:]
    assert "pipeline.workers = auto" in help_.stdout and "--print-config" in help_.stdout
    printed = subprocess.run([str(venv / "bin" / "raypipe-train"), "--config", "flowers",
                              "--print-config"], cwd=elsewhere, env=clean, capture_output=True,
                             text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert "class_names:\n  - daisy\n  - roses" in printed.stdout
    for command in ("raypipe-evaluate", "raypipe-tune", "raypipe-benchmark"):
        done = subprocess.run([str(venv / "bin" / command), "--help"], cwd=elsewhere, env=clean,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
