"""The wheel installs the top-level folders daemon/ and connectors/ as the packages
drstream.daemon and drstream.connectors (every subpackage found, so a new connector package
needs no line here), so drstream shares an environment with python-daemon, which installs
a top-level `daemon`. It also builds the optional compiled decoder (daemon/_ccodec.c):
`optional=True`, so on a machine without a C compiler or Python headers the build prints a
warning and installs the pure-Python package, which uses daemon/codec.py. Everything else
is in pyproject.toml."""

from setuptools import Extension, find_packages, setup

FOLDERS = ("daemon", "connectors")

setup(
    packages=[f"drstream.{p}" for p in find_packages(
        include=[pattern for f in FOLDERS for pattern in (f, f"{f}.*")])],
    package_dir={f"drstream.{f}": f for f in FOLDERS},
    ext_modules=[
        Extension("drstream.daemon._ccodec", ["daemon/_ccodec.c"], optional=True),
    ],
)
