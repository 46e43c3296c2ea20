"""Package discovery (everything else is in pyproject.toml).

``methods/`` and ``datasets/`` are top-level folders installed as ``regbench.methods`` and ``regbench.datasets``
(pyproject's ``package-dir``); setuptools' ``find`` cannot rename what it finds, so the packages are found here: every
package under ``regbench/`` plus every package under the two mapped folders, prefixed. A new subpackage anywhere is
installed without editing a list (tests/test_packaging.py builds the wheel and imports every module from it).
"""
from setuptools import find_packages, setup

MAPPED = ("methods", "datasets")

packages = find_packages(include=["regbench", "regbench.*"])
for folder in MAPPED:
    packages += [f"regbench.{name}" for name in find_packages(include=[folder, f"{folder}.*"])]

setup(packages=packages)
