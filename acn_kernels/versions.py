"""The software stack this package is tested on, and the check of the one it finds.

CI runs the tests on each stack in TESTED (.ci/run); the GPU machine's is among them. This file
imports nothing of the package and nothing heavier than the standard library, so that
`python acn_kernels/versions.py` prints the found-against-tested lines before torch is imported
(scripts/gpu_check.sh does, on the lent machine's own python).
"""
import importlib.metadata
import os
import sys

__version__ = "0.1.0"  # the package's (pyproject.toml reads it here)

# (python, torch, triton) as CI installs them (.ci/run's three venvs); the first is the lent GPU
# machine's. Versions compare by major.minor.
TESTED = (
    ("3.12", "2.11", "3.6"),
    ("3.11", "2.13", "3.9"),
    ("3.11", "2.14", "3.8"),
)
# Each stack's (build, where it runs, what runs on it): the table `python -m acn_kernels stacks` prints
# into docs/testing.md.
ROLES = {
    TESTED[0]: ("", "the lent GPU machine's; `.venv-gpu-stack` in CI",
                "`tests/test_ops.py` under the interpreter (every op, path and dtype), `compile-report --target 90` "
                "clean (the lent machine's sm_90)"),
    TESTED[1]: (" (CPU)", "`.venv` in CI, the README's commands",
                "the whole suite; `compile-report --check docs/compile-report.md`"),
    TESTED[2]: (".1 (CUDA build)", "`.venv-cuda` in CI",
                "the extension (setup.py for sm_80 and sm_90, CMake configured for sm_90), timm / Hugging Face tests "
                "(their fused paths under 3.8's interpreter); `compile-report --target 90` clean (the interpreter "
                "runs every op on 3.6 and 3.9, which bracket it)"),
}
PACKAGES = ("python", "torch", "triton")
# The oldest versions tested; below them nothing was ever run, so the import refuses.
MINIMUM = {"torch": (2, 11), "triton": (3, 6)}


def _release(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0)."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def _minor(version: str) -> str:
    """'2.13.0+cpu' -> '2.13'."""
    return ".".join(map(str, _release(version)[:2]))


def found() -> dict[str, str | None]:
    """{package: the installed version, or None}."""
    versions = {"python": "%d.%d.%d" % sys.version_info[:3]}
    for name in ("torch", "triton", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def tested(package: str) -> list[str]:
    return sorted({stack[PACKAGES.index(package)] for stack in TESTED}, key=_release)


def differences(versions: dict[str, str | None] | None = None) -> list[str]:
    """One line for each found version that no tested stack has."""
    versions = found() if versions is None else versions
    lines = []
    for package in PACKAGES:
        version = versions.get(package)
        if version is None or _minor(version) not in tested(package):
            lines.append(f"{package} {version or 'not installed'}: tested with {', '.join(tested(package))}")
    return lines


def unsupported(versions: dict[str, str | None] | None = None, interpreted: bool | None = None) -> str | None:
    """Why this stack cannot run the package, in one line, or None."""
    versions = found() if versions is None else versions
    for package, minimum in MINIMUM.items():
        version = versions.get(package)
        if version is not None and _release(version)[:2] < minimum:
            return (f"acn_kernels needs {package} >= {'.'.join(map(str, minimum))}, found {version} "
                    f"(tested: {', '.join(tested(package))})")
    if interpreted is None:
        interpreted = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
    # Triton 3.6's interpreter reads a loop bound with int() of a 1-element array, which numpy 2.4
    # refuses ("only 0-dimensional arrays can be converted"); Triton 3.7 squeezes it first.
    triton, numpy = versions.get("triton"), versions.get("numpy")
    if interpreted and triton and numpy and _release(triton)[:2] == (3, 6) and _release(numpy)[:2] >= (2, 4):
        return (f"Triton {triton}'s interpreter (TRITON_INTERPRET=1) needs numpy < 2.4, found numpy {numpy}: "
                "pip install 'numpy<2.4', or Triton >= 3.7")
    return None


def stacks_table() -> str:
    """The tested stacks as a markdown table, with the range pyproject.toml declares."""
    pythons, torches, tritons = (tested(package) for package in PACKAGES)
    lines = [f"Python {pythons[0]}-{pythons[-1]}, torch {torches[0]}-{torches[-1]}, Triton {', '.join(tritons)}: "
             "CI runs each stack below; an older torch or Triton is refused at import, in one line.", "",
             "| stack | where | what runs on it |", "|---|---|---|"]
    for stack in TESTED:
        build, where, runs = ROLES[stack]
        lines.append(f"| Python {stack[0]}, torch {stack[1]}{build}, Triton {stack[2]} | {where} | {runs} |")
    return "\n".join(lines)


def report() -> str:
    """The found versions, then one line for each that differs from the tested ones; every line starts
    with "versions"."""
    versions = found()
    lines = ["versions found: " + ", ".join(f"{name} {version or '-'}" for name, version in versions.items())]
    lines += [f"versions untested: {line}" for line in differences(versions)] or ["versions: every one found is tested"]
    problem = unsupported(versions)
    return "\n".join(lines + ([f"versions unsupported: {problem}"] if problem else []))


if __name__ == "__main__":
    print(report())
