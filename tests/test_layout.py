"""The package's layout (docs/architecture.md): data flows one way, from the command line down to the
kernels; no module imports from a floor above its own, and the reference imports nothing it checks."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "acn_kernels"
FLOORS = [  # lowest first; a module may import from its own floor and the ones below
    {"_validation", "_extras", "versions", "_interpreter", "backend", "reference", "_C"},  # _C: the CUDA extension
    {"ops"},
    {"long_connections", "speculative"},
    {"models", "convert", "depth", "training"},
    {"parallel"},
    {"experiments", "tools", "integrations", "info"},
    {"cli", "__main__", "acn_kernels"},  # acn_kernels: __init__, the public API
]


def room(module: str) -> str:
    """acn_kernels.ops.accumulate_norm -> ops; acn_kernels.backend -> backend; acn_kernels (and a name of its
    __init__, as `from . import __version__` gives) -> acn_kernels."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and not parts[1].startswith("__v") else parts[0]


def floor(module: str) -> int:
    return next(i for i, rooms in enumerate(FLOORS) if room(module) in rooms)


def imports(path: pathlib.Path) -> set:
    """The package's modules `path` imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts if path.name == "__init__.py" else parts[:-1]
    package = package[:-1] if path.name == "__init__.py" and parts[-1] == "__init__" else package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found |= {".".join([*base, *name.split(".")]) for name in names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("acn_kernels"):
            found.add(node.module)
    return found


def test_no_module_imports_from_a_floor_above_its_own():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for target in imports(path):
            if floor(target) > floor(module):
                upward.append(f"{module} imports {target}")
    assert not upward, upward


def test_the_reference_imports_nothing_of_the_package():
    assert imports(PACKAGE / "reference.py") == set()
