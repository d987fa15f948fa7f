"""A plain (not editable) install, and the sdist and wheel of a release, carry what the
commands need besides code: the configs, the sbatch templates and the reference curves, found
from any working directory."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fresh_venv_with(venv: Path, what: str, cwd: Path) -> str:
    """A virtual environment with ``what`` (a source folder or a wheel) installed into it, not
    editable; returns its site-packages folder."""
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
                              "--no-build-isolation", "--no-index", "--quiet", what], capture_output=True,
                             text=True, timeout=600, cwd=cwd)
    assert install.returncode == 0, install.stderr[-3000:]
    return site


@pytest.mark.slow
def test_pip_install_dot_in_a_fresh_venv_works_from_another_directory(tmp_path):
    venv = tmp_path / "venv"
    site = fresh_venv_with(venv, str(REPO), tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import pretrain; print(pretrain.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, check=True).stdout.strip()
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
    assert (shipped / "slurm" / "local-cluster.sh").is_file()
    # Package data: the report reads it at run time.
    assert (Path(where).parent / "reference_curves.json").is_file()


@pytest.mark.slow
def test_sdist_then_wheel_installs_and_runs_a_stage_from_another_directory(tmp_path):
    """``python -m build`` makes the sdist and then the wheel from the unpacked sdist (so the
    sdist must carry everything the wheel needs); the wheel, installed into a fresh virtual
    environment, answers ``--help`` and ``--version`` and builds and verifies shards from
    another directory."""
    import numpy as np
    import soundfile as sf

    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO)],
                           capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    sdist, = dist.glob("pretrain-*.tar.gz")
    wheel, = dist.glob("pretrain-*.whl")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"LICENSE", "configs/demo.yaml", "slurm/train.sbatch", "pretrain/reference_curves.json"} <= names
    # Every module of the checkout is in the wheel (a folder without __init__.py once was not).
    with zipfile.ZipFile(wheel) as whl:
        packed = {n for n in whl.namelist() if n.endswith(".py")}
    code = {str(p.relative_to(REPO)) for top in ("pretrain", "launch") for p in (REPO / top).rglob("*.py")}
    assert code - packed == set()

    venv = tmp_path / "venv"
    site = fresh_venv_with(venv, str(wheel), tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "audio" / "spk1").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        sf.write(elsewhere / "audio" / "spk1" / f"utt{i}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32),
                 16000, subtype="PCM_16")

    def run(*argv: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True,
                              cwd=elsewhere, timeout=300)
        assert proc.returncode == 0, (argv, proc.stderr[-3000:])
        return proc

    assert run("pretrain", "--version").stdout.strip() == "pretrain 0.1.0"
    assert run("launch", "--version").stdout.strip() == "launch (pretrain 0.1.0)"
    assert "iterate" in run("pretrain", "--help").stdout and "slurm" in run("launch", "--help").stdout
    run("pretrain", "shards", "build", "--input", "audio", "--out", "shards", "--no-progress")
    assert "3 utterances" in run("pretrain", "shards", "verify", "shards").stdout
    where = run("python", "-c", "import pretrain; print(pretrain.__file__)").stdout.strip()
    assert where.startswith(site), where
