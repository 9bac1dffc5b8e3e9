"""Results of the checks that are pure functions of files and the toolchain, kept by a hash of exactly
those inputs: the compile report's rows (a kernel's source and the jit functions and constants it
reaches, the Triton version, the target, the build's options), cuda-report's ptxas rows and the
CUDA host check's builds (their sources and compiler flags).

The folder is `$XDG_CACHE_HOME/acn_kernels` (`~/.cache/acn_kernels`), or ACN_KERNELS_CACHE; nothing
there is needed, so deleting it at any time only makes the next run compute everything again, with
the same output. An entry is written to a temporary name and renamed, so processes that share the
folder never read half of one.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import pathlib
import textwrap


def cache_dir() -> pathlib.Path:
    explicit = os.environ.get("ACN_KERNELS_CACHE")
    if explicit:
        return pathlib.Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "acn_kernels"


def digest(*parts) -> str:
    """sha256 of the parts, in order: strings, bytes, or anything JSON writes (sorted keys)."""
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else part.encode() if isinstance(part, str) else \
            json.dumps(part, sort_keys=True, default=repr).encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def file_digest(*paths) -> str:
    """sha256 of files' names and bytes."""
    return digest(*(part for path in paths for part in (pathlib.Path(path).name, pathlib.Path(path).read_bytes())))


class Store:
    """JSON values under one kind of check (`kind/ab/abcdef....json`); hits and misses counted."""

    def __init__(self, kind: str, root: pathlib.Path | None = None):
        self.folder = (root or cache_dir()) / kind
        self.hits = self.misses = 0

    def _path(self, key: str) -> pathlib.Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str):
        path = self._path(key)
        try:
            value = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(f".{os.getpid()}.tmp")
        staged.write_text(json.dumps(value))
        staged.replace(path)


def jit_source_key(fn) -> str:
    """sha256 of a Triton jit function's source and, recursively, of every jit function and module-level
    constant its source names (through a module too: `_common.load_rows`). Unlike Triton's own
    cache_key it leaves out line numbers, so a kernel's key changes only with what it compiles from."""
    parts, seen = [], set()

    def visit(function) -> None:
        if id(function) in seen:
            return
        seen.add(id(function))
        source, scope = jit_parts(function)
        parts.append(source)
        for node in ast.walk(ast.parse(source)):
            value = _named(node, scope)
            if jit_parts(value) is not None:
                visit(value)
            elif isinstance(value, (bool, int, float, str)) or type(value).__name__ == "constexpr":
                parts.append(f"{ast.unparse(node)}={value!r}")

    visit(fn)
    return digest(*parts)


def jit_parts(value) -> tuple[str, dict] | None:
    """(source, globals) of a Triton jit function, compiled or (TRITON_INTERPRET=1) interpreted; else None."""
    if hasattr(value, "src") and hasattr(value, "__globals__"):
        return value.src, value.__globals__
    if type(value).__name__ == "InterpretedFunction":
        return textwrap.dedent(inspect.getsource(value.fn)), value.fn.__globals__
    return None


def _named(node, scope: dict):
    """The object a Name or a module's Attribute refers to in `scope`, else None."""
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        owner = scope.get(node.value.id)
        if type(owner).__name__ == "module" and not owner.__name__.startswith("triton"):
            return getattr(owner, node.attr, None)
    return None
