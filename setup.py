"""The wheel installs the top-level folders daemon/ and connectors/ as the packages
drstream.daemon and drstream.connectors (every subpackage found, so a new connector package
needs no line here), so drstream shares an environment with python-daemon, which installs
a top-level `daemon`. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

FOLDERS = ("daemon", "connectors")

setup(
    packages=[f"drstream.{p}" for p in find_packages(
        include=[pattern for f in FOLDERS for pattern in (f, f"{f}.*")])],
    package_dir={f"drstream.{f}": f for f in FOLDERS},
)
