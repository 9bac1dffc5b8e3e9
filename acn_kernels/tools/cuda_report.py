"""`python -m acn_kernels cuda-report`: compile every csrc/*.cu for sm_80 and sm_90 with
`nvcc -Xptxas -v` (no GPU and no torch needed: the kernels include no torch headers) and print each
kernel's registers and spills. Exits non-zero if a file fails to compile or a kernel spills."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

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


def run_cuda_report() -> int:
    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda-report needs nvcc: set CUDA_HOME or put nvcc on PATH", file=sys.stderr)
        return 2
    sources = sorted(CSRC.glob("*.cu"))
    if not sources:
        print(f"no CUDA sources in {CSRC} (cuda-report runs from a source checkout)", file=sys.stderr)
        return 2
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    failures = 0
    print(f"{'file':<26} {'target':<6} {'regs':>5} {'spills':>6}  kernel")
    for source in sources:
        result = subprocess.run([nvcc, "-std=c++17", "-O3", "-c", str(source), "-o", os.devnull, f"-I{CSRC}",
                                 "-Xptxas", "-v", *gencode], capture_output=True, text=True)
        if result.returncode != 0:
            failures += 1
            print(f"{source.name:<26} FAILED\n{result.stderr[-2000:]}")
            continue
        for row in parse_ptxas(result.stderr):
            failures += row["spills"] > 0
            flag = "  SPILLS" if row["spills"] else ""
            kernel = short_name(row["kernel"])
            print(f"{source.name:<26} {row['target']:<6} {row['registers']:>5} {row['spills']:>6}  {kernel}{flag}")
    print(f"\n{len(sources)} files, {failures} failed or spilled")
    return 1 if failures else 0
