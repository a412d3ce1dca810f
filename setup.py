"""Ships ``gsoft-peft-hint.pth`` at the top of site-packages and lists the packages (pyproject.toml holds the rest).

The .pth line imports the tiny stdlib-only ``_gsoft_peft_hint`` module, so loading a GSOFT adapter before
``import gsoft`` fails with a message that says to import it (see that module). Regular wheels get the file through
``build_py``; editable installs (``pip install -e .``) through ``editable_wheel``, whose unpacked-wheel directory is
written into the wheel as is.

Packages: ``gsoft`` with every subpackage, plus ``gsoft.kernels``, which pyproject.toml's ``package-dir`` maps to the
top-level ``kernels/`` directory (``packages.find`` cannot discover a remapped directory).
"""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsoft-peft-hint.pth")


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, os.path.basename(PTH)))


class editable_wheel_with_pth(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(PTH, installation_dir)


HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = [*find_packages(where=HERE, include=["gsoft", "gsoft.*"]), "gsoft.kernels"]

setup(packages=PACKAGES, cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
