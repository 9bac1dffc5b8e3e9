"""`python -m acn_kernels cuda-report`: compile every csrc/*.cu for sm_80 and sm_90 with
`nvcc -Xptxas -v` and the extension build's flags (no GPU needed: the kernels include no torch
headers) and print each kernel's registers and spills; `--build-log FILE` reads them from the
extension build's own output instead. Exits non-zero if a file fails to compile or a kernel spills."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

from .cache import Store, digest, file_digest

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
ARCHS = ("80", "90")


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home and (pathlib.Path(cuda_home) / "bin" / "nvcc").exists():
        return str(pathlib.Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    return subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()


def short_name(demangled: str) -> str:
    """`void acn::(anonymous namespace)::k<float, 4>(float const*, ...)` -> `k<float, 4>`."""
    name = demangled.removeprefix("void ").replace("(anonymous namespace)::", "").removeprefix("acn::")
    return name.split("(")[0]


def parse_ptxas(log: str) -> list[dict]:
    """Rows of (kernel, target, registers, spill bytes) from ptxas -v output."""
    rows, current = [], None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if entry:
            current = {"kernel": entry.group(1), "target": entry.group(2), "spills": 0, "registers": None}
            rows.append(current)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill and current is not None:
            current["spills"] = int(spill.group(1)) + int(spill.group(2))
        used = re.search(r"Used (\d+) registers", line)
        if used and current is not None:
            current["registers"] = int(used.group(1))
    for row, name in zip(rows, demangle([r["kernel"] for r in rows])):
        row["kernel"] = name
    return rows


def nvcc_flags() -> list[str]:
    """What the extension's build passes nvcc besides the sources (setup.py's -O3 and -Xptxas -v, torch's
    defines, both targets), so that the registers here are the shipped kernels'."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return ["-std=c++17", "-O3", "-Xptxas=-v", *COMMON_NVCC_FLAGS, f"-I{CSRC}",
            *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS)]


def compiled_rows(nvcc: str, source: pathlib.Path) -> list[dict] | str:
    """ptxas's rows of one .cu (from the cache where the same source, headers, nvcc and flags were
    compiled before), or the compiler's error."""
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    headers = sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))
    key = digest(file_digest(pathlib.Path(__file__), source, *headers), version, nvcc_flags())
    store = Store("cuda-report")
    rows = store.get(key)
    if rows is None:
        result = subprocess.run([nvcc, "-c", str(source), "-o", os.devnull, *nvcc_flags()], capture_output=True,
                                text=True)
        if result.returncode != 0:
            return result.stderr[-2000:]
        rows = parse_ptxas(result.stderr)
        store.put(key, rows)
    return rows


NVCC_COMMAND = re.compile(r"nvcc\b.*\s-c\s+(?:-c\s+)?(\S+\.cu)\b")
NINJA_STEP = re.compile(r"^\s*\[\d+/\d+\]")


def rows_from_build_log(log: str) -> dict[str, list[dict]]:
    """{source file name: ptxas's rows} from the extension build's output (pip -v or setup.py: each nvcc
    command line, then its ptxas -v report, until the next command)."""
    found, current = {}, None
    for line in log.splitlines(keepends=True):
        command = NVCC_COMMAND.search(line)
        if command:
            current = found.setdefault(pathlib.Path(command.group(1)).name, [])
        elif NINJA_STEP.match(line):
            current = None
        elif current is not None:
            current.append(line)
    return {name: parse_ptxas("".join(lines)) for name, lines in found.items()}


def run_cuda_report(build_log: str | None = None) -> int:
    """Every csrc/*.cu compiled (or, with build_log, read from the extension build's own ptxas -v
    output, so that CI compiles the sources once); non-zero on a failed compile, a source the log lacks
    or a spill."""
    sources = sorted(CSRC.glob("*.cu"))
    if not sources:
        print(f"no CUDA sources in {CSRC} (cuda-report runs from a source checkout)", file=sys.stderr)
        return 2
    nvcc = find_nvcc()
    if build_log is not None:
        logged = rows_from_build_log(pathlib.Path(build_log).read_text(errors="replace"))
        rows_of = {s: logged.get(s.name) or f"{build_log} has no ptxas report of {s.name}" for s in sources}
    elif nvcc is None:
        print("cuda-report needs nvcc: set CUDA_HOME or put nvcc on PATH", file=sys.stderr)
        return 2
    else:
        rows_of = {s: compiled_rows(nvcc, s) for s in sources}
    failures = 0
    print(f"{'file':<26} {'target':<6} {'regs':>5} {'spills':>6}  kernel")
    for source, rows in rows_of.items():
        if isinstance(rows, str):
            failures += 1
            print(f"{source.name:<26} FAILED\n{rows}")
            continue
        for row in rows:
            failures += row["spills"] > 0
            flag = "  SPILLS" if row["spills"] else ""
            kernel = short_name(row["kernel"])
            print(f"{source.name:<26} {row['target']:<6} {row['registers']:>5} {row['spills']:>6}  {kernel}{flag}")
    print(f"\n{len(sources)} files, {failures} failed or spilled")
    return 1 if failures else 0
