"""Build script. Package metadata lives in pyproject.toml.

The compiled extension ``sparse_kernels._C`` (csrc/) is added here once it exists;
until then this is a pure-Python package.
"""
from setuptools import setup

setup()
