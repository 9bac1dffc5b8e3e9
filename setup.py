"""Build script: metadata lives in pyproject.toml.

The install is pure Python. The optional CUDA extension (`acn_kernels._C`, sources in `csrc/`)
is added here by the CUDA backend; until then nothing is compiled at install time.
"""
from setuptools import setup

setup()
