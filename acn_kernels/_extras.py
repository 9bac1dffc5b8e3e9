"""Optional packages, each from one of the package's extras: a missing one says which extra to install."""
from __future__ import annotations

import importlib
import importlib.metadata
import re


class MissingExtra(ImportError):
    """An optional package is not installed; the message names it and the extra that brings it.
    The command line prints it as one line and exits 2."""


def require(module: str, extra: str, what: str):
    """The imported module, or MissingExtra naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(f"{what} needs {module.split('.')[0]}: pip install 'acn-kernels[{extra}]'") from error


def extra_requirements(extra: str) -> list[str]:
    """The distributions the installed package's `extra` lists (empty when it runs uninstalled, from
    a source tree: then `require` still names the extra at the first missing import)."""
    try:
        requirements = importlib.metadata.requires("acn-kernels") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    pattern = re.compile(rf"""^([A-Za-z0-9._-]+)[^;]*;.*\bextra\s*==\s*["']{re.escape(extra)}["']""")
    return [m.group(1) for r in requirements if (m := pattern.match(r))]


def check_extra(extra: str, what: str) -> None:
    """MissingExtra before any work starts, when a distribution of `extra` is not installed."""
    missing = []
    for name in extra_requirements(extra):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise MissingExtra(f"{what} needs {', '.join(missing)}: pip install 'acn-kernels[{extra}]'")
