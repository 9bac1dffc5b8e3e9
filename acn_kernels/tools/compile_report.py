"""`python -m acn_kernels compile-report`: compile every Triton kernel for real GPUs, without one.

For each kernel, each dtype and each block configuration its launcher can pick, Triton compiles
to PTX and a cubin for sm_80 and sm_90; Triton's bundled ptxas (`-v`) then reports registers and
spills. Each kernel is built with every optional feature on (bias, running sum, stored z, ...),
the variant with the most live values. Exits non-zero if a kernel fails to compile or spills.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

TARGETS = (80, 90)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Build:
    """One compilation: a kernel (by module and name), the dtype of its activations, the pointer
    arguments held in float32 whatever that dtype, the constexprs and the launch options."""
    module: str
    kernel: str
    dtype: torch.dtype
    constexprs: dict = field(hash=False)
    float32_pointers: tuple = ()
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None

    def config(self) -> str:
        shown = {k: v for k, v in self.constexprs.items() if k.startswith(("BLOCK", "ACTIVATION"))}
        precision = {"INPUT_PRECISION": self.constexprs["INPUT_PRECISION"]} if self.dtype == torch.float32 and \
            "INPUT_PRECISION" in self.constexprs else {}
        return " ".join(f"{k}={v}" for k, v in {**shown, **precision}.items()) + f" warps={self.num_warps}"

    def options(self) -> dict:
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return {**options, "maxnreg": self.maxnreg} if self.maxnreg else options


def norm_builds():
    """Every row tile the norm launchers can pick (all powers of two up to the widest row that
    fits in registers) and the chunked kernels for wider rows."""
    from ..ops._common import chunk_tile, launch_options, row_tile
    from ..ops.accumulate_norm import BWD_PER_THREAD, FWD_PER_THREAD
    from ..ops.probe_norm import BWD_PER_THREAD as PROBE_BWD, FWD_PER_THREAD as PROBE_FWD

    stats = ("w_ptr", "b_ptr", "mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr")
    fwd = (dict(HAS_Y=True, HAS_BIAS=True, IS_LAYERNORM=True, NORMALIZE_SUM=True), stats + ("y_ptr", "y_out_ptr"))
    bwd = (dict(HAS_DY_OUT=True, STORE_DY=True, HAS_BIAS=True, IS_LAYERNORM=True), stats + ("dy_out_ptr", "dy_ptr"))
    probe = (dict(HAS_BIAS=True, IS_LAYERNORM=True), stats)
    norm, probe_module = "acn_kernels.ops.accumulate_norm", "acn_kernels.ops.probe_norm"
    # (module, kernel, flags and float32 pointers, elements per thread, widest row in registers)
    row_kernels = (
        (norm, "accumulate_norm_fwd_kernel", fwd, FWD_PER_THREAD, FWD_PER_THREAD),
        (norm, "accumulate_norm_bwd_kernel", bwd, BWD_PER_THREAD, BWD_PER_THREAD),
        (probe_module, "probe_norm_fwd_kernel", probe, PROBE_FWD, PROBE_BWD),
        (probe_module, "probe_norm_bwd_kernel", probe, PROBE_BWD, PROBE_BWD),
    )
    for module, kernel, (flags, fp32_pointers), per_thread, widest_per_thread in row_kernels:
        widest = chunk_tile(1, widest_per_thread)[0]
        for block_d in (2 ** p for p in range(widest.bit_length())):
            block_rows, _, num_warps = row_tile(block_d, per_thread)
            for dtype in DTYPES:
                yield Build(module, kernel, dtype, {**flags, "BLOCK_ROWS": block_rows, "BLOCK_D": block_d},
                            fp32_pointers, **launch_options(num_warps))
    for kernel, (flags, fp32_pointers), per_thread in (("accumulate_norm_fwd_wide_kernel", fwd, FWD_PER_THREAD),
                                                       ("accumulate_norm_bwd_wide_kernel", bwd, BWD_PER_THREAD)):
        block_d, _, num_warps = chunk_tile(1, per_thread)
        for dtype in DTYPES:
            yield Build(norm, kernel, dtype, {**flags, "BLOCK_D": block_d}, fp32_pointers, **launch_options(num_warps))


def linear_builds():
    from ..ops.linear_act_accumulate import ACTIVATIONS, ELEMENTWISE_BLOCK, gemm_tiles

    module = "acn_kernels.ops.linear_act_accumulate"
    for dtype in DTYPES:
        # float32 follows torch's TF32 switch, so both precisions are configurations it can use.
        for precision in (("ieee", "tf32") if dtype == torch.float32 else ("ieee",)):
            for size in (16, 32, 64, 4096):  # from the smallest tile to the full one
                tiles = gemm_tiles(size, size, size, dtype)
                launch = {k: tiles.pop(k) for k in ("num_warps", "num_stages")}
                constexprs = dict(ACTIVATION="gelu_tanh", HAS_BIAS=True, HAS_Y=True, STORE_Z=True,
                                  DOT_IN_FP32=False, INPUT_PRECISION=precision, **tiles)
                yield Build(module, "linear_act_accumulate_fwd_kernel", dtype, constexprs,
                            ("y_ptr", "y_out_ptr"), **launch)
        for act in ACTIVATIONS:
            yield Build(module, "activation_backward_kernel", dtype,
                        dict(HAS_DH=True, HAS_DY_OUT=True, ACTIVATION=act, BLOCK=ELEMENTWISE_BLOCK),
                        ("dy_out_ptr",))


def signature(kernel, build: Build) -> dict:
    types = {}
    for name in kernel.arg_names:
        if name in build.constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*" + ("fp32" if name in build.float32_pointers else TRITON_TYPES[build.dtype])
        else:
            types[name] = "fp32" if name == "eps" else "i32"
    return types


def ptxas_report(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill bytes) from Triton's bundled ptxas -v."""
    import triton

    ptxas_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = os.path.join(ptxas_dir, "ptxas-blackwell")  # the newest PTX ISA; it also targets sm_80
    if not os.path.exists(ptxas):
        ptxas = os.path.join(ptxas_dir, "ptxas")
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        result = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", source.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", result.stderr).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr))
    return registers, spills


def compile_one(job: tuple[Build, int]) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    build, capability = job
    kernel = getattr(importlib.import_module(build.module), build.kernel)
    row = {"kernel": build.kernel, "config": build.config(), "target": f"sm_{capability}",
           "dtype": TRITON_TYPES[build.dtype]}
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature(kernel, build), constexprs=build.constexprs),
            target=GPUTarget("cuda", capability, 32),
            options=build.options())
        registers, spills = ptxas_report(compiled.asm["ptx"], capability)
    except Exception as error:  # noqa: BLE001 - every failure becomes a failed row, and the exit code says so
        return {**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    return {**row, "registers": registers, "spills": spills, "shared": compiled.metadata.shared}


def all_builds(only: str | None):
    builds = [*norm_builds(), *linear_builds()]
    return [b for b in builds if only is None or b.kernel == only]


def run_report(only: str | None = None, jobs: int | None = None) -> int:
    from ..backend import TRITON_INTERPRETED

    if TRITON_INTERPRETED:
        print("compile-report compiles for GPUs: unset TRITON_INTERPRET and run it again", file=sys.stderr)
        return 2
    work = [(build, capability) for build in all_builds(only) for capability in TARGETS]
    if not work:
        print(f"no kernel named {only!r}", file=sys.stderr)
        return 2
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        rows = list(pool.map(compile_one, work))
    print(f"{'kernel':<34} {'config':<52} {'target':<6} {'dtype':<5} {'regs':>5} {'spills':>6} {'smem':>7}")
    failures = 0
    for row in rows:
        head = f"{row['kernel']:<34} {row['config']:<52} {row['target']:<6} {row['dtype']:<5}"
        if "error" in row:
            failures += 1
            print(f"{head} FAILED {row['error']}")
            continue
        failures += row["spills"] > 0
        flag = "  SPILLS" if row["spills"] else ""
        print(f"{head} {row['registers']:>5} {row['spills']:>6} {row['shared']:>7}{flag}")
    print(f"\n{len(rows)} compilations, {failures} failed or spilled")
    return 1 if failures else 0
