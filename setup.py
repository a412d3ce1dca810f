"""Ships ``gsoft-peft-hint.pth`` at the top of site-packages (pyproject.toml holds everything else).

The .pth line imports the tiny stdlib-only ``_gsoft_peft_hint`` module, so loading a GSOFT adapter before
``import gsoft`` fails with a message that says to import it (see that module). Regular wheels get the file through
``build_py``; editable installs (``pip install -e .``) through ``editable_wheel``, whose unpacked-wheel directory is
written into the wheel as is.
"""

import os
import shutil

from setuptools import setup
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


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
