"""`python -m acn_kernels bench`: the fused ops and whole training steps against eager PyTorch and
torch.compile, measured in the same run.

Implementations: "eager" (the reference: eager PyTorch), "compile" (torch.compile of the
reference), "triton" (the fused ops, GEMMs on the Triton kernel; GPU only, since the interpreter's
timings mean nothing), "cublas" (the GEMM ops on cuBLAS and Triton elementwise kernels, auto's default
until measured; for a model, every GEMM so), "cuda" (the CUDA extension, when it is built).
Figures: median time, GB/s of the op's logical bytes (its docstring count) and that as a fraction
of the copy bandwidth measured in the same run, TFLOP/s for the GEMM op, peak memory (GPU),
speedups against eager and against compile. A table on stdout, rows appended to a CSV with the
device, versions and commit, and PNG plots of the speedups.
"""
from __future__ import annotations

import csv
import datetime
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import reference
from .._extras import require
from ..backend import CUDA_EXTENSION, gpu_family
from ..models import GPT, MLP, Mixer, ViT
from ..ops import accumulate_norm, feed_forward, hybrid_accumulate_norm, linear, linear_act_accumulate, probe_norm
from ..ops.accumulate_norm import traffic_bound as norm_bound
from ..ops.feed_forward import traffic_bound as feed_forward_bound
from ..ops.hybrid_accumulate_norm import traffic_bound as hybrid_bound
from ..ops.linear import traffic_bound as plain_linear_bound
from ..ops.linear_act_accumulate import traffic_bound as linear_bound
from ..ops.probe_norm import traffic_bound as probe_bound

PASSES = ("forward", "backward", "forward+backward")


@dataclass
class Case:
    suite: str
    name: str
    dtype: torch.dtype
    make: Callable  # impl -> (forward thunk, inputs needing grad); models: impl -> step thunk
    bytes: tuple = (0, 0)  # (forward, backward) logical bytes of the fused op
    flops: tuple = (0, 0)
    impls: tuple = ("eager", "compile", "triton", "cuda")

    @property
    def op(self) -> str:
        return self.name.split()[0]


@dataclass
class Result:
    case: Case
    pass_: str
    impl: str
    ms: float
    peak_mb: float | None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- timing

def time_ms(fn: Callable, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() after warm-up: CUDA events via triton.testing.do_bench on a
    GPU, wall-clock medians on the CPU."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """GB/s of a device copy (read + write) measured now, the roofline the ops are held against."""
    nbytes = (256 if device.type == "cuda" else 64) * 2**20
    src = torch.empty(nbytes // 4, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def peak_memory_mb(fn: Callable, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**20


# ----------------------------------------------------------------------------- cases

def _inputs(device, dtype, *shapes):
    return [torch.randn(shape, device=device).to(dtype if len(shape) > 1 else torch.float32).requires_grad_()
            for shape in shapes]


def _op_make(fused, ref, inputs, kwargs):
    compiled = torch.compile(lambda *a: ref(*a, **kwargs))

    def make(impl):
        runs = {"eager": lambda: ref(*inputs, **kwargs), "compile": lambda: compiled(*inputs)}
        fn = runs.get(impl, lambda: fused(*inputs, backend=impl, **kwargs))  # a backend: triton, cublas, cuda
        return fn, [t for t in inputs if t.requires_grad]
    return make


NORM_IMPLS = ("eager", "compile", "triton", "cuda")  # "cublas" runs the norm ops' Triton kernels
GEMM_IMPLS = ("eager", "compile", "triton", "cublas", "cuda")


def op_cases(device: torch.device, quick: bool) -> list[Case]:
    """The norm ops at a transformer's widths; the GEMM ops at a square 8192 x 2048 x 2048 and at a
    ViT-S/16 block's shapes (batch 64, 197 tokens: the MLP, 384 -> 1536 -> 384, and the qkv linear)."""
    if quick:
        norm_sizes, probe_size, gemm_size, dtypes = [(512, 256)], (5, 256, 128), (256, 128, 128), (torch.float32,)
        mlp_size = (256, 128, 256)
    else:
        norm_sizes = [(4096, 1024), (8192, 2048), (16384, 4096)]
        probe_size, gemm_size, dtypes = (13, 4096, 768), (8192, 2048, 2048), (torch.float32, torch.bfloat16)
        mlp_size = (64 * 197, 384, 1536)
    cases = []
    for dtype in dtypes:
        for rows, dim in norm_sizes:
            x, y, w, b = _inputs(device, dtype, (rows, dim), (rows, dim), (dim,), (dim,))
            cases.append(Case("ops", f"accumulate_norm {rows}x{dim}", dtype,
                              _op_make(accumulate_norm, reference.accumulate_norm, (x, y, w, b), {}),
                              norm_bound(x, y, w, b)))
            f, gate = _inputs(device, dtype, (rows, dim), ())
            cases.append(Case("ops", f"hybrid_accumulate_norm {rows}x{dim}", dtype,
                              _op_make(hybrid_accumulate_norm, reference.hybrid_accumulate_norm, (x, f, y, gate, w, b),
                                       {}), hybrid_bound(x, f, y, gate, w, b)))
        depth, rows, dim = probe_size
        xs, w, b = _inputs(device, dtype, (depth, rows, dim), (dim,), (dim,))
        cases.append(Case("ops", f"probe_norm {depth}x{rows}x{dim}", dtype,
                          _op_make(probe_norm, reference.probe_norm, (xs, w, b), {}), probe_bound(xs, w, b)))
        m, k, n = gemm_size
        x, wl, bl, y = _inputs(device, dtype, (m, k), (n, k), (n, n), (m, n))
        bl = torch.randn(n, device=device).to(dtype).requires_grad_()
        cases.append(Case("ops", f"linear_act_accumulate {m}x{k}x{n}", dtype,
                          _op_make(linear_act_accumulate, reference.linear_act_accumulate, (x, wl, bl, y),
                                   {"activation": "gelu"}),
                          linear_bound(x, wl, bl, y), (2 * m * n * k, 4 * m * n * k), GEMM_IMPLS))
        rows, dim, hidden = mlp_size
        x, w1, w2, wq = _inputs(device, dtype, (rows, dim), (hidden, dim), (dim, hidden), (3 * dim, dim))
        b1, b2, bq = (torch.randn(n, device=device).to(dtype).requires_grad_() for n in (hidden, dim, 3 * dim))
        cases.append(Case("ops", f"feed_forward {rows}x{dim}x{hidden}", dtype,
                          _op_make(feed_forward, reference.feed_forward, (x, w1, b1, w2, b2), {"activation": "gelu"}),
                          feed_forward_bound(x, w1, b1, w2, b2), (4 * rows * dim * hidden, 8 * rows * dim * hidden),
                          GEMM_IMPLS))
        cases.append(Case("ops", f"linear {rows}x{dim}x{3 * dim}", dtype,
                          _op_make(linear, reference.linear, (x, wq, bq), {}), plain_linear_bound(x, wq, bq),
                          (6 * rows * dim * dim, 12 * rows * dim * dim), GEMM_IMPLS[:-1]))  # cuda: F.linear too
    return cases


def tokens(batch: int, length: int, vocab: int):
    """A language model's batch maker: (inputs, next-token targets) of random tokens."""
    def make(device):
        rows = torch.randint(0, vocab, (batch, length + 1), device=device)
        return rows[:, :-1], rows[:, 1:]
    return make


def classes(shape: tuple):
    """A classifier's batch maker: (random inputs, class 0 targets)."""
    return lambda device: (torch.randn(shape, device=device), torch.zeros(shape[0], dtype=torch.int64, device=device))


def model_specs(quick: bool):
    """(name, constructor(connectivity, backend), batch maker (device -> inputs, targets), autocast dtype or None)."""
    if quick:
        return [("MLP 64-d x6", lambda c, b: MLP(64, 64, 6, 10, connectivity=c, backend=b), classes((32, 64)), None),
                ("GPT 64-d x2", lambda c, b: GPT(256, 32, 64, 2, 2, connectivity=c, backend=b), tokens(4, 32, 256),
                 None)]
    return [
        ("GPT-2 small 1024", lambda c, b: GPT(50304, 1024, 768, 12, 12, connectivity=c, backend=b),
         tokens(8, 1024, 50304), torch.bfloat16),
        ("Llama-style 1024", lambda c, b: GPT(50304, 1024, 768, 12, 12, connectivity=c, norm="rmsnorm", mlp="swiglu",
                                               positions="rotary", backend=b), tokens(8, 1024, 50304), torch.bfloat16),
        ("ViT-S/16 224", lambda c, b: ViT(224, 16, 3, 384, 12, 6, 1536, 1000, connectivity=c, backend=b),
         classes((64, 3, 224, 224)), torch.bfloat16),
        ("ViT CIFAR", lambda c, b: ViT(32, 4, 3, 192, 9, 3, 384, 10, connectivity=c, backend=b),
         classes((128, 3, 32, 32)), torch.bfloat16),
        ("Mixer (paper)", lambda c, b: Mixer(32, 4, 3, 128, 16, 64, 512, 10, connectivity=c, backend=b),
         classes((64, 3, 32, 32)), torch.bfloat16),
        ("MLP 1024-d x8", lambda c, b: MLP(3072, 1024, 8, 10, connectivity=c, backend=b),
         classes((256, 3072)), torch.bfloat16),
    ]


def model_cases(device: torch.device, quick: bool) -> list[Case]:
    cases = []
    for name, build, batch, amp in model_specs(quick):
        for connectivity in ("acn", "residual", "ffn", "hybrid"):
            def make(impl, build=build, batch=batch, amp=amp, connectivity=connectivity):
                backend = "reference" if impl in ("eager", "compile") else impl
                torch.manual_seed(0)
                model = build(connectivity, backend).to(device)
                run = torch.compile(model) if impl == "compile" else model
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                inputs, targets = batch(device)

                def step():
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        loss = F.cross_entropy(run(inputs).float().flatten(0, -2), targets.flatten())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                return step
            # every twin: on the fused backends their MLPs run the fused ops, the connections differ (the
            # hybrid's boundaries on hybrid_accumulate_norm)
            cases.append(Case("models", f"{name} {connectivity}", amp or torch.float32, make, impls=GEMM_IMPLS))
    return cases


# ----------------------------------------------------------------------------- running

def run_op_case(case: Case, impls, device, repeats) -> list[Result]:
    results = []
    for impl in impls:
        fn, inputs = case.make(impl)
        outputs = fn()
        outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o.requires_grad]
        grads = [torch.randn_like(o) for o in outputs]

        def backward():
            torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=True)

        def both():
            outs = fn()
            outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.requires_grad]
            torch.autograd.grad(outs, inputs, grads, allow_unused=True)
        for pass_, thunk in zip(PASSES, (fn, backward, both)):
            results.append(Result(case, pass_, impl, time_ms(thunk, device, repeats), peak_memory_mb(thunk, device)))
    return results


def run_model_case(case: Case, impls, device, repeats) -> list[Result]:
    results = []
    for impl in impls:
        step = case.make(impl)
        results.append(Result(case, "train step", impl, time_ms(step, device, repeats), peak_memory_mb(step, device)))
    return results


def derive(results: list[Result], copy_gbps: float) -> None:
    """Fills GB/s, fraction of copy bandwidth, TFLOP/s and the speedups, from the same run."""
    by_key = {(r.case.name, r.case.dtype, r.pass_, r.impl): r for r in results}
    for r in results:
        nbytes = {"forward": r.case.bytes[0], "backward": r.case.bytes[1]}.get(r.pass_, sum(r.case.bytes))
        flops = {"forward": r.case.flops[0], "backward": r.case.flops[1]}.get(r.pass_, sum(r.case.flops))
        seconds = r.ms * 1e-3
        r.extra["gbps"] = nbytes / seconds / 1e9 if nbytes else None
        r.extra["copy_fraction"] = r.extra["gbps"] / copy_gbps if nbytes else None
        r.extra["tflops"] = flops / seconds / 1e12 if flops else None
        for base in ("eager", "compile"):
            other = by_key.get((r.case.name, r.case.dtype, r.pass_, base))
            r.extra[f"vs_{base}"] = other.ms / r.ms if other else None
        # what the long connections cost: the acn (or hybrid) step over its ffn twin's, same implementation
        model, _, twin = r.case.name.rpartition(" ")
        ffn = by_key.get((model + " ffn", r.case.dtype, r.pass_, r.impl)) \
            if r.case.suite == "models" and twin in ("acn", "hybrid") else None
        r.extra["over_ffn"] = r.ms / ffn.ms if ffn else None


def _fmt(value, spec):
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))


def print_table(results: list[Result], device_label: str, copy_gbps: float) -> None:
    print(f"\ndevice: {device_label}; copy bandwidth measured now: {copy_gbps:.1f} GB/s")
    print(f"{'case':<38} {'dtype':<8} {'pass':<16} {'impl':<8} {'ms':>9} {'GB/s':>8} {'%copy':>6} "
          f"{'TFLOP/s':>8} {'peak MB':>8} {'vs eager':>8} {'vs compile':>10} {'/ffn twin':>9}")
    for r in results:
        x = r.extra
        print(f"{r.case.name:<38} {str(r.case.dtype).replace('torch.', ''):<8} {r.pass_:<16} {r.impl:<8} "
              f"{r.ms:>9.3f} {_fmt(x['gbps'], '8.1f')} {_fmt(x['copy_fraction'] and 100 * x['copy_fraction'], '6.1f')} "
              f"{_fmt(x['tflops'], '8.2f')} {_fmt(r.peak_mb, '8.1f')} {_fmt(x['vs_eager'], '8.2f')} "
              f"{_fmt(x['vs_compile'], '10.2f')} {_fmt(x['over_ffn'], '9.2f')}")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_csv(results: list[Result], path: str, device_label: str) -> None:
    import triton

    header = ["time", "commit", "device", "torch", "triton", "suite", "case", "dtype", "pass", "impl", "median_ms",
              "gbps", "copy_fraction", "tflops", "peak_mb", "vs_eager", "vs_compile", "over_ffn"]
    if os.path.exists(path):
        with open(path, newline="") as f:
            old_header = next(csv.reader(f), None)
        if old_header != header:  # an older version's columns: keep that file, start a new one
            os.replace(path, path + ".old")
            print(f"{path} had other columns; moved to {path}.old")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for r in results:
            x = r.extra
            writer.writerow([stamp, _commit(), device_label, torch.__version__, triton.__version__, r.case.suite,
                             r.case.name, str(r.case.dtype).replace("torch.", ""), r.pass_, r.impl, f"{r.ms:.4f}",
                             x["gbps"], x["copy_fraction"], x["tflops"], r.peak_mb, x["vs_eager"], x["vs_compile"],
                             x["over_ffn"]])


def plot(results: list[Result], path: str, title: str) -> None:
    require("matplotlib", "bench", "bench's plots").use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.impl != "eager"]
    labels = [f"{r.case.name} {str(r.case.dtype).replace('torch.', '')} {r.pass_} [{r.impl}]" for r in shown]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(shown))))
    ax.barh(range(len(shown)), [r.extra["vs_eager"] for r in shown],
            color=["tab:orange" if r.impl == "compile" else "tab:blue" for r in shown])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup against eager PyTorch (same run)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FUSED_IMPLS = ("triton", "cublas", "cuda")


def measured_auto_table(results: list[Result]) -> dict[str, str]:
    """{op: the fastest of triton, cublas and cuda over all its cases and dtypes (forward+backward
    time)}, for each op where two or more of them ran: what backend="auto" should run on this GPU family."""
    totals: dict[str, dict[str, float]] = {}
    for r in results:
        if r.case.suite == "ops" and r.pass_ == "forward+backward" and r.impl in FUSED_IMPLS:
            by_impl = totals.setdefault(r.case.op, {})
            by_impl[r.impl] = by_impl.get(r.impl, 0.0) + r.ms
    return {op: min(by_impl, key=by_impl.get) for op, by_impl in totals.items() if len(by_impl) > 1}


def print_auto_table(results: list[Result], device: torch.device) -> None:
    print(f"\nbackend='auto' as measured here, for AUTO_TABLE in acn_kernels/backend.py (ops not named keep "
          f"the default): {{{gpu_family(device)!r}: {measured_auto_table(results)!r}}}")


def run_bench(quick: bool = False, suites=("ops", "models"), out_dir: str = "results", only: str | None = None) -> int:
    """The suites' cases (those whose "name dtype" `only`, a regular expression, finds), each
    implementation this machine runs; a table, the CSV and plots."""
    tqdm = require("tqdm", "bench", "bench").tqdm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not quick:
        print("no GPU here: running the quick CPU suite (reference against torch.compile); "
              "the full suite needs a CUDA GPU")
        quick = True
    repeats = 20 if quick else 50
    device_label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    usable = ("eager", "compile")
    if device.type == "cuda":
        usable += ("triton", "cublas", "cuda") if CUDA_EXTENSION is not None else ("triton", "cublas")
    os.makedirs(out_dir, exist_ok=True)
    copy_gbps = copy_bandwidth(device, repeats)
    all_results, interrupted = [], False
    for suite in suites:
        cases = op_cases(device, quick) if suite == "ops" else model_cases(device, quick)
        cases = [c for c in cases if only is None or re.search(only, f"{c.name} {str(c.dtype).removeprefix('torch.')}")]
        results = []
        try:
            for case in tqdm(cases, desc=f"bench {suite} ({device_label})", unit="case"):
                impls = [i for i in case.impls if i in usable]
                runner = run_op_case if suite == "ops" else run_model_case
                results.extend(runner(case, impls, device, repeats))
        except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: keep what was measured
            interrupted = True
            print(f"\ninterrupted: keeping the {len(results)} results of {suite} measured so far")
        if results:
            derive(results, copy_gbps)
            plot(results, os.path.join(out_dir, f"bench_{suite}.png"), f"acn-kernels {suite}, {device_label}")
            all_results.extend(results)
        if interrupted:
            break
    print_table(all_results, device_label, copy_gbps)
    if device.type == "cuda":
        print_auto_table(all_results, device)
    csv_path = os.path.join(out_dir, "bench.csv")
    write_csv(all_results, csv_path, device_label)
    print(f"\nrows appended to {csv_path}; plots in {out_dir}/")
    return 130 if interrupted else 0
