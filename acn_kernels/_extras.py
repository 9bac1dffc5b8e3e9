"""Optional packages, each from one of the package's extras: a missing one says which extra to install."""
from __future__ import annotations

import importlib


def require(module: str, extra: str, what: str):
    """The imported module, or an ImportError naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{what} needs {module.split('.')[0]}: pip install 'acn-kernels[{extra}]'") from error
