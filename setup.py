"""Ships the top-level ``configs/`` and ``slurm/`` inside the package
(``pretrain/_shipped/``) when it is built, so that a plain ``pip install .`` has them too;
``pretrain.resources`` finds them in a source checkout or in the installed package.
Everything else is in setup.cfg."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"configs": "configs", "slurm": "slurm"}


class BuildWithResources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "pretrain" / "_shipped"
        for source, name in SHIPPED.items():
            src, dst = ROOT / source, target / name
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildWithResources})
