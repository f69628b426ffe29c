"""Packaging beyond pyproject.toml: the top-level recipes/ folder ships inside the wheel as mmclip/recipes,
so a plain `pip install mmclip` runs `mmclip train` (the repository keeps recipes/ at its top level)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["mmclip", "mmclip.*"]), "mmclip.recipes"],
    package_dir={"mmclip.recipes": "recipes"},
    package_data={"mmclip": ["assets/*"], "mmclip.recipes": ["*.yaml", "*/*.yaml", "README.md"]},
    include_package_data=False,
)
