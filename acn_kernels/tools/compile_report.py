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
from itertools import product

import torch

from .cache import Store, digest, file_digest, jit_source_key

REPORT_CODE = file_digest(__file__)
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
    unit_strides: tuple = ("a_stride_k", "b_stride_k")  # a GEMM's unit strides, which the JIT makes constants
    other_types: dict = field(default_factory=dict, hash=False)  # argument -> Triton type, where not the default

    def config(self) -> str:
        shown = {k: v for k, v in self.constexprs.items() if k.startswith(("BLOCK", "ACTIVATION", "EPILOGUE"))
                 or (k == "STORE_H" and not v) or (k == "HYBRID" and v)}
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
    from ..ops._rows import BWD_PER_THREAD, FWD_PER_THREAD
    from ..ops.probe_norm import BWD_PER_THREAD as PROBE_BWD, FWD_PER_THREAD as PROBE_FWD, bwd_per_thread

    stats = ("w_ptr", "b_ptr", "mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr")
    scalars = ("gate_ptr", "long_weight_ptr", "dscalars_ptr")
    plain_fwd = dict(HAS_Y=True, HAS_BIAS=True, IS_LAYERNORM=True, NORMALIZE_SUM=True, HYBRID=False, LONG_WEIGHT=False)
    plain_bwd = dict(HAS_DY_OUT=True, STORE_DY=True, HAS_BIAS=True, IS_LAYERNORM=True, HYBRID=False, LONG_WEIGHT=False,
                     HAS_DSHORT_OUT=False)
    # the boundary kernels twice: accumulate_norm's (float32 y, the sum normalized) and the hybrid's
    boundary_fwd = ((plain_fwd, stats + ("y_ptr", "y_out_ptr")),
                    ({**plain_fwd, "NORMALIZE_SUM": False, "HYBRID": True, "LONG_WEIGHT": True},
                     stats + scalars + ("y_ptr", "y_out_ptr")))
    boundary_bwd = ((plain_bwd, stats + ("dy_out_ptr", "dy_ptr")),
                    ({**plain_bwd, "STORE_DY": False, "HYBRID": True, "LONG_WEIGHT": True, "HAS_DSHORT_OUT": True},
                     stats + scalars + ("dy_out_ptr",)))
    probe = ((dict(HAS_BIAS=True, IS_LAYERNORM=True), stats),)
    norm, probe_module = "acn_kernels.ops._rows", "acn_kernels.ops.probe_norm"
    # (module, kernel, variants of flags and float32 pointers, elements per thread by dtype, widest row in registers)
    row_kernels = (
        (norm, "accumulate_norm_fwd_kernel", boundary_fwd, lambda _: FWD_PER_THREAD, FWD_PER_THREAD),
        (norm, "accumulate_norm_bwd_kernel", boundary_bwd, lambda _: BWD_PER_THREAD, BWD_PER_THREAD),
        (probe_module, "probe_norm_fwd_kernel", probe, lambda _: PROBE_FWD, PROBE_BWD),
        (probe_module, "probe_norm_bwd_kernel", probe, bwd_per_thread, PROBE_BWD),
    )
    for module, kernel, variants, per_thread, widest_per_thread in row_kernels:
        widest = chunk_tile(1, widest_per_thread)[0]
        for (flags, fp32_pointers), block_d, dtype in product(variants, (2 ** p for p in range(widest.bit_length())),
                                                               DTYPES):
            block_rows, _, num_warps = row_tile(block_d, per_thread(dtype))
            yield Build(module, kernel, dtype, {**flags, "BLOCK_ROWS": block_rows, "BLOCK_D": block_d},
                        fp32_pointers, **launch_options(num_warps))
    for kernel, variants, per_thread in (("accumulate_norm_fwd_wide_kernel", boundary_fwd, FWD_PER_THREAD),
                                         ("accumulate_norm_bwd_wide_kernel", boundary_bwd, BWD_PER_THREAD)):
        block_d, _, num_warps = chunk_tile(1, per_thread)
        for (flags, fp32_pointers), dtype in product(variants, DTYPES):
            yield Build(norm, kernel, dtype, {**flags, "BLOCK_D": block_d}, fp32_pointers, **launch_options(num_warps))


def linear_builds():
    from ..ops._gemm import TILE_KEYS, tile_configs
    from ..ops._gemm import ACTIVATIONS
    from ..ops.linear_act_accumulate import ELEMENTWISE_BLOCK

    gemm = "acn_kernels.ops._gemm"
    for dtype, gated in product(DTYPES, (False, True)):
        # float32 follows torch's TF32 switch, so both precisions are configurations it can use.
        for precision in (("ieee", "tf32") if dtype == torch.float32 else ("ieee",)):
            for config in tile_configs(dtype, gated):  # every tile the launcher can pick
                tiles = dict(zip(TILE_KEYS, config), GROUP_M=8)
                launch = {k: tiles.pop(k) for k in ("num_warps", "num_stages")}
                constexprs = dict(EPILOGUE="forward", ACTIVATION="swiglu" if gated else "gelu_tanh", HAS_BIAS=True,
                                  HAS_Y=True, STORE_H=True, STORE_Z=True, DOT_IN_FP32=False,
                                  INPUT_PRECISION=precision, **tiles)
                yield Build(gemm, "gemm_kernel", dtype, constexprs, ("y_ptr", "y_out_ptr"), **launch)
                # feed_forward's backward GEMM: dz = (dout @ w2) * act'(z), w2 read with its unit stride along N
                if config in tile_configs(dtype, gated, "times_activation_grad"):
                    yield Build(gemm, "gemm_kernel", dtype,
                                {**constexprs, "EPILOGUE": "times_activation_grad", "HAS_BIAS": False, "HAS_Y": False,
                                 "STORE_Z": False}, (), **launch, unit_strides=("a_stride_k", "b_stride_n"))
                if gated:
                    continue
                # the last block of a chain: y_out only
                yield Build(gemm, "gemm_kernel", dtype, {**constexprs, "STORE_H": False}, ("y_ptr", "y_out_ptr"),
                            **launch)
                # every weight gradient: dout.T @ x and dout's column sums, both operands read transposed
                if config in tile_configs(dtype, gated, "weight_grad"):
                    yield Build(gemm, "gemm_kernel", dtype,
                                {**constexprs, "EPILOGUE": "weight_grad", "ACTIVATION": "identity", "HAS_Y": False,
                                 "STORE_Z": False}, (), **launch, unit_strides=("a_stride_m", "b_stride_n"))
        if gated:
            continue
        elementwise = "acn_kernels.ops.linear_act_accumulate"
        for act in ACTIVATIONS:
            yield Build(elementwise, "activation_backward_kernel", dtype,
                        dict(HAS_DH=True, HAS_DY_OUT=True, ACTIVATION=act, BLOCK=ELEMENTWISE_BLOCK),
                        ("dy_out_ptr",))
            # the "cublas" path's forward epilogue, a float32 running sum beside z
            yield Build(elementwise, "activation_epilogue_kernel", dtype,
                        dict(HAS_Y=True, STORE_H=True, ACTIVATION=act, BLOCK=ELEMENTWISE_BLOCK), ("y_ptr", "y_out_ptr"))


# What the JIT does at launch: an integer equal to 1 becomes a constexpr, and (the "aligned" case)
# 16-byte-aligned pointers and integers divisible by 16 carry tt.divisibility = 16. Aligned assumes the
# usual shapes, every width, stride and count divisible by 16; layer and chunk counts are left alone.
UNSPECIALIZED = ("depth", "num_chunks", "eps", "ignore_index", "label_smoothing", "z_loss", "softcap")
ALIGNMENTS = ("aligned", "unaligned")
UNGATED = ("gemm_kernel",)  # a GEMM: its operands go through shared memory


def signature(kernel, build: Build) -> dict:
    types = {}
    for name in kernel.arg_names:
        if name in build.constexprs or name in build.unit_strides:
            types[name] = "constexpr"
        elif name in build.other_types:
            types[name] = build.other_types[name]
        elif name.endswith("_ptr"):
            types[name] = "*" + ("fp32" if name in build.float32_pointers else TRITON_TYPES[build.dtype])
        else:
            types[name] = "fp32" if name == "eps" else "i32"
    return types


def specialization(kernel, build: Build, alignment: str) -> tuple[dict, dict]:
    """(constexprs, attrs) of the compilation the JIT runs for this alignment."""
    constexprs = {**build.constexprs, **{name: 1 for name in build.unit_strides if name in kernel.arg_names}}
    if alignment == "unaligned":
        return constexprs, {}
    divisible = [i for i, name in enumerate(kernel.arg_names)
                 if name not in constexprs and name not in UNSPECIALIZED]
    return constexprs, {(i,): [["tt.divisibility", 16]] for i in divisible}


def ptxas_path() -> str:
    """Triton's bundled ptxas: the newest PTX ISA's (it also targets sm_80) where there are two."""
    import triton

    ptxas_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = os.path.join(ptxas_dir, "ptxas-blackwell")
    return ptxas if os.path.exists(ptxas) else os.path.join(ptxas_dir, "ptxas")


def ptxas_report(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill bytes) from Triton's bundled ptxas -v."""
    ptxas = ptxas_path()
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        result = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", source.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", result.stderr).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr))
    return registers, spills


# ----------------------------------------------------------------------------- reading the PTX

PARAM_LOAD = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)\]")
REGISTER = re.compile(r"%[a-z]+\d+")
# Norm parameters, statistics and partial rows: every other pointer a kernel takes is row data.
NOT_ROW_DATA = ("w_ptr", "b_ptr", "mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr", "gate_ptr", "long_weight_ptr",
                "dscalars_ptr", "targets_ptr", "scale_ptr", "loss_ptr", "lse_ptr", "stats_ptr", "argmax_ptr")


def _instruction(line: str) -> str:
    """A PTX line without its predicate guard (`@%p1 ld.global...` -> `ld.global...`)."""
    line = line.strip()
    return line.split(" ", 1)[1].strip() if line.startswith("@") and " " in line else line


def _access(instruction: str) -> tuple[str, int, str] | None:
    """(kind, bytes, address register) of a global load, store or async copy, else None."""
    opcode, _, operands = instruction.partition(" ")
    parts = opcode.split(".")
    if parts[0] == "cp" and "global" in parts:  # cp.async.cg.shared.global [smem], [global], bytes{, src bytes}
        _, source, rest = operands.split("]", 2)
        return "load", int(rest.strip(" ,;").split(",")[0], 0), REGISTER.findall(source)[0]
    if parts[0] not in ("ld", "st") or "global" not in parts:
        return None
    vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next(int(m.group(1)) for p in parts if (m := re.fullmatch(r"[bfsu](\d+)", p)))
    address = REGISTER.findall(operands[operands.index("["):operands.index("]")])[0]
    return ("load" if parts[0] == "ld" else "store"), vector * bits // 8, address


def access_widths(ptx: str, pointer_params: dict) -> dict:
    """{"load": [bytes, ...], "store": [...]} of every global access of row data: each address
    register is traced back, through the arithmetic that forms it, to the kernel parameters it
    derives from; `pointer_params` maps a PTX parameter index to its pointer's name."""
    instructions = [_instruction(line) for line in ptx.splitlines()]
    params: dict = {}
    for _ in range(8):  # to a fixed point: loops carry addresses around
        changed = False
        for instruction in instructions:
            loaded = PARAM_LOAD.search(instruction)
            if loaded:
                register, found = loaded.group(1), {int(loaded.group(2))}
            else:
                registers = REGISTER.findall(instruction)
                if len(registers) < 2 or instruction.startswith(("ld.global", "st.", "cp.", "setp", "bra")):
                    continue
                register, found = registers[0], set().union(*(params.get(r, set()) for r in registers[1:]))
            if not found <= params.get(register, set()):
                params[register] = params.get(register, set()) | found
                changed = True
        if not changed:
            break
    widths = {"load": [], "store": []}
    for instruction in instructions:
        access = _access(instruction)
        if access is None:
            continue
        kind, size, address = access
        names = {pointer_params[i] for i in params.get(address, ()) if i in pointer_params}
        if names and not names <= set(NOT_ROW_DATA):
            widths[kind].append(size)
    return widths


# ----------------------------------------------------------------------------- occupancy

@dataclass(frozen=True)
class SM:
    """Per-SM limits of a target (CUDA occupancy calculator): registers are allocated per warp in
    units of 256, and each block also reserves 1 KiB of shared memory."""
    shared: int
    max_warps: int = 64
    max_blocks: int = 32
    registers: int = 65536


SMS = {80: SM(shared=167936), 90: SM(shared=233472)}


def resident_warps(capability: int, registers: int, shared: int, num_warps: int) -> int:
    sm = SMS[capability]
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(sm.max_blocks, sm.max_warps // num_warps, (sm.registers // per_warp) // num_warps,
                 sm.shared // (shared + 1024))
    return blocks * num_warps


def compile_one(job: tuple[Build, str, int]) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    build, alignment, capability = job
    kernel = getattr(importlib.import_module(build.module), build.kernel)
    row = {"kernel": build.kernel, "config": build.config(), "target": f"sm_{capability}",
           "dtype": TRITON_TYPES[build.dtype], "alignment": alignment}
    try:
        types = signature(kernel, build)
        constexprs, attrs = specialization(kernel, build, alignment)
        # FMA contraction as the JIT decides it (said explicitly, which spares a warning per compilation);
        # the force-disable knob came after Triton 3.6
        language = triton.knobs.language
        fusion = language.default_fp_fusion and not getattr(language, "force_disable_fp_fusion", False)
        compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", capability, 32),
                                  options={**build.options(), "enable_fp_fusion": fusion})
        ptx = compiled.asm["ptx"]
        registers, spills = ptxas_report(ptx, capability)
    except Exception as error:  # noqa: BLE001 - every failure becomes a failed row, and the exit code says so
        return {**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    runtime_args = [name for name, kind in types.items() if kind != "constexpr"]
    widths = access_widths(ptx, {i: name for i, name in enumerate(runtime_args) if name.endswith("_ptr")})
    warps = resident_warps(capability, registers, compiled.metadata.shared, build.num_warps)
    block = build.constexprs.get("BLOCK_D", build.constexprs.get("BLOCK", 0))
    return {**row, "registers": registers, "spills": spills, "shared": compiled.metadata.shared,
            "tile_bytes": block * build.dtype.itemsize,
            "loads": widths["load"], "stores": widths["store"], "warps": warps,
            # Little's law: what the resident threads ask of memory before any of them must wait
            "in_flight": warps * 32 * sum(widths["load"]),
            "matrix": matrix_instructions(ptx) if build.kernel in UNGATED else "-",
            "wgmma_expected": wgmma_expected(build, capability)}


def matrix_instructions(ptx: str) -> str:
    """What runs a GEMM's tl.dot: Hopper's asynchronous warp-group MMA, the warp MMA, or plain FMAs
    (float32 without TF32)."""
    return "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma"


def wgmma_expected(build: Build, capability: int) -> bool:
    """sm_90 GEMM tiles of 64 rows or more on tensor-core operands (16-bit, or float32 as TF32): a
    warp group's wgmma is what Hopper's peak needs."""
    tensor_cores = build.dtype != torch.float32 or build.constexprs.get("INPUT_PRECISION") == "tf32"
    return build.kernel in UNGATED and capability == 90 and tensor_cores and build.constexprs["BLOCK_M"] >= 64


def loss_builds():
    """depth_cross_entropy's row kernels on their float32 logits: every tile their launcher can pick, the
    softcap (and the fused pass's gradient) on; the fused pass and the split pass's statistics and
    gradient kernels."""
    from ..ops.depth_cross_entropy import ROW_BLOCK, row_launch

    scalars = {"targets_ptr": "*i64", "argmax_ptr": "*i64", "label_smoothing": "fp32", "z_loss": "fp32",
               "softcap": "fp32"}
    kernels = (("cross_entropy_rows_kernel", dict(NEEDS_GRAD=True)), ("cross_entropy_statistics_kernel", {}),
               ("cross_entropy_gradient_kernel", {}))
    for kernel, flags in kernels:
        for block in (2 ** p for p in range(7, ROW_BLOCK.bit_length())):
            block, num_warps = row_launch(block)
            yield Build("acn_kernels.ops.depth_cross_entropy", kernel, torch.float32,
                        dict(HAS_SOFTCAP=True, **flags, BLOCK=block), num_warps=num_warps, other_types=scalars)


def all_builds(only: str | None):
    builds = [*norm_builds(), *linear_builds(), *loss_builds()]
    return [b for b in builds if only is None or b.kernel == only]


def _widths(sizes: list) -> str:
    return f"{min(sizes)}-{max(sizes)}" if sizes and min(sizes) != max(sizes) else (str(sizes[0]) if sizes else "-")


def narrow_access(row: dict) -> bool:
    """An aligned norm, probe or elementwise kernel that moves row data in accesses under 16 bytes,
    where its row tile is wide enough for 16-byte accesses."""
    if row["alignment"] != "aligned" or row["kernel"] in UNGATED or row["tile_bytes"] < 16:
        return False
    return min(row["loads"] + row["stores"], default=16) < 16


def print_rows(rows: list) -> int:
    print(f"{'kernel':<34} {'config':<44} {'target':<6} {'dtype':<5} {'align':<9} {'regs':>4} {'spill':>5} "
          f"{'smem':>6} {'ld B':>5} {'st B':>5} {'warps/SM':>8} {'KiB in flight':>13} {'mma':>5}")
    failures = 0
    for row in rows:
        head = f"{row['kernel']:<34} {row['config']:<44} {row['target']:<6} {row['dtype']:<5} {row['alignment']:<9}"
        if "error" in row:
            failures += 1
            print(f"{head} FAILED {row['error']}")
            continue
        flags = (["SPILLS"] if row["spills"] else []) + (["NARROW"] if narrow_access(row) else []) \
            + (["NO_WGMMA"] if row["wgmma_expected"] and row["matrix"] != "wgmma" else [])
        failures += bool(flags)
        print(f"{head} {row['registers']:>4} {row['spills']:>5} {row['shared']:>6} {_widths(row['loads']):>5} "
              f"{_widths(row['stores']):>5} {row['warps']:>8} {row['in_flight'] / 1024:>13.1f} {row['matrix']:>5}"
              + ("  " + " ".join(flags) if flags else ""))
    return failures


def job_key(job: tuple[Build, str, int], toolchain: str) -> str:
    """What a row is a pure function of: this module (how rows are read from the PTX), the toolchain
    (Triton's version, its ptxas, the FMA-contraction setting), the kernel's source and every jit
    function and constant it reaches, the build, the alignment and the target."""
    import importlib

    build, alignment, capability = job
    kernel = getattr(importlib.import_module(build.module), build.kernel)
    fields = [build.module, build.kernel, str(build.dtype), build.constexprs, build.float32_pointers, build.options(),
              build.unit_strides, build.other_types]
    return digest(REPORT_CODE, toolchain, jit_source_key(kernel), fields, alignment, capability)


def toolchain_key() -> str:
    import triton

    ptxas = ptxas_path()
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    language = triton.knobs.language
    return digest(triton.__version__, version, language.default_fp_fusion,
                  getattr(language, "force_disable_fp_fusion", False))


def compiled_rows(work: list, jobs: int | None) -> list:
    """compile_one of every job, each from the cache (tools/cache.py) where an earlier run compiled the
    same inputs; misses compiled in parallel and kept (failures are not kept: they may be the machine's)."""
    store, toolchain = Store("compile-report"), toolchain_key()
    keys = [job_key(job, toolchain) for job in work]
    rows = [store.get(key) for key in keys]
    missing = [i for i, row in enumerate(rows) if row is None]
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        for i, row in zip(missing, pool.map(compile_one, [work[i] for i in missing])):
            rows[i] = row
            if "error" not in row:
                store.put(keys[i], row)
    print(f"compile-report: {len(missing)} compiled, {len(work) - len(missing)} from the cache in {store.folder}",
          file=sys.stderr)
    return rows


def run_report(only: str | None = None, jobs: int | None = None, target: int | None = None) -> int:
    """Every build (or `only` one) for every target (or `target` alone), aligned and unaligned; the
    exit code is 1 on any failure, spill, narrow aligned access or missing wgmma."""
    from ..backend import TRITON_INTERPRETED

    if TRITON_INTERPRETED:
        print("compile-report compiles for GPUs: unset TRITON_INTERPRET and run it again", file=sys.stderr)
        return 2
    work = [(build, alignment, capability) for build in all_builds(only) for alignment in ALIGNMENTS
            for capability in (TARGETS if target is None else (target,))]
    if not work:
        print(f"no kernel named {only!r}", file=sys.stderr)
        return 2
    rows = compiled_rows(work, jobs)
    failures = print_rows(rows)
    print("\nld B / st B: narrowest-widest global access of row data per thread, from the PTX; warps/SM: resident "
          "warps of 64 (registers, shared memory, block limits); KiB in flight: what the resident threads load "
          "before any must wait (row loads in the PTX x resident threads); mma: what runs a GEMM's tl.dot "
          "(wgmma, mma.sync or fma), NO_WGMMA where an sm_90 tile of 64+ rows on tensor-core operands misses wgmma")
    print(f"{len(rows)} compilations, {failures} failed, spilled, narrower than 16 bytes when aligned or without "
          f"wgmma where sm_90 should use it")
    return 1 if failures else 0
