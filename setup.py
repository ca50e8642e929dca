"""pip install --no-build-isolation .  (in a venv made with --system-site-packages, so that Debian's
torch is seen): builds the extension linmix._C with the project's CMake release preset (the
same build as scripts/build.sh) and installs the package python/linmix."""
import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildWithCMake(build_py):
    def run(self):
        subprocess.check_call(["cmake", "--preset", "release", f"-DPython3_EXECUTABLE={sys.executable}"], cwd=ROOT)
        subprocess.check_call(["cmake", "--build", "--preset", "release", "--target", "linmix_torch"], cwd=ROOT)
        super().run()


setup(
    name="linmix",
    version="0.1.0",
    description="linear-time token mixers on the CPU: every mechanism as a PyTorch autograd op",
    packages=["linmix"],
    package_dir={"": "python"},
    package_data={"linmix": ["_C*.so"]},  # _C and, where built, _C_v4
    cmdclass={"build_py": BuildWithCMake},
    python_requires=">=3.9",
)
