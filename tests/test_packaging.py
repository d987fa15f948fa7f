"""A plain (not editable) install carries what the commands need besides code: the configs,
the sbatch templates and the reference curves, found from any working directory."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_dot_in_a_fresh_venv_works_from_another_directory(tmp_path):
    venv = tmp_path / "venv"
    # Without its own pip and setuptools (ensurepip's setuptools predates a built-in bdist_wheel):
    # this environment's pip installs into it (--python), building with this one's setuptools.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (torch & co.) from the test environment, without its editable pretrain:
    # a directory named in a .pth file is not itself scanned for .pth files.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-build-isolation", "--no-index", "--quiet", str(REPO)], capture_output=True,
                             text=True, timeout=600, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import pretrain; print(pretrain.__file__)"], capture_output=True,
                           text=True, cwd=elsewhere, check=True).stdout.strip()
    assert where.startswith(site), where  # the installed copy, not the checkout
    printed = subprocess.run([str(venv / "bin" / "pretrain"), "iterate", "--config", "configs/demo.yaml",
                              "run_dir=runs/x", "--print-config"], capture_output=True, text=True, cwd=elsewhere,
                             timeout=300)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert "synth_hours: 1.0" in printed.stdout and "configs/small_cpu.yaml" in printed.stdout
    dry = subprocess.run([str(venv / "bin" / "launch"), "slurm", "--profile", "configs/cluster/local.yaml",
                          "--dry-run", "train", "--config", "configs/small_cpu.yaml", "data.shards=/data/shards",
                          "data.labels=[km100]", f"run_dir={elsewhere / 'run'}"],
                         capture_output=True, text=True, cwd=elsewhere, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "#SBATCH --ntasks-per-node=2" in dry.stdout and "srun --kill-on-bad-exit=1" in dry.stdout
    shipped = Path(where).parent / "_shipped"
    assert (shipped / "slurm" / "local-cluster.sh").is_file() and (shipped / "reference_curves.json").is_file()
