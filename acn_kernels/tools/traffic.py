"""`python -m acn_kernels traffic`: logical bytes and launches, eager PyTorch against the fused ops.

Measured on the CPU, no GPU needed:
- eager PyTorch (the reference backend) by observing every aten op with a TorchDispatchMode: an op
  reads its tensor inputs and writes its tensor outputs, once each; views and allocations move
  nothing;
- the fused path by counting what the Triton kernels load and store under Triton's interpreter:
  the distinct addresses each launch touches (what must cross DRAM at least once; a weight row
  re-read by every program counts once), plus the aten ops the launchers and autograd run.

Each launch of a kernel or an aten op counts as one launch.

One exception models the GPU rather than the CPU: `F.rms_norm` (nn.RMSNorm, the reference's RMSNorm)
counts as one kernel each way, as CUDA builds of torch run it (`_fused_rms_norm`: forward reads x
and the weight, writes the output and a float per row; backward reads the output's gradient, x, the
weight and the per-row floats, writes dx and dweight), where torch's CPU build runs it as a dozen
elementwise ops and reductions that would inflate eager's side and the twins that keep nn.RMSNorm.
"""
from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils._pytree import tree_leaves

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh"}


@dataclass
class Traffic:
    read: int = 0
    written: int = 0
    launches: int = 0

    @property
    def total(self) -> int:
        return self.read + self.written


def _unique_bytes(tensors) -> int:
    regions = {(t.data_ptr(), t.numel() * t.element_size()) for t in tensors
               if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    return sum(size for _, size in regions)


@dataclass
class _Launch:
    """The addresses one Triton launch loads and stores, by element size."""
    loads: dict = field(default_factory=lambda: defaultdict(list))
    stores: dict = field(default_factory=lambda: defaultdict(list))

    @staticmethod
    def _bytes(groups) -> int:
        return sum(size * _distinct(np.concatenate(parts)) for size, parts in groups.items())


def _distinct(addresses: np.ndarray) -> int:
    """How many distinct values (a sort: numpy's hashing np.unique is about 100x slower on these arrays)."""
    ordered = np.sort(addresses)
    return int(ordered.size and 1 + np.count_nonzero(ordered[1:] != ordered[:-1]))


class TrafficCounter(TorchDispatchMode):
    """Counts bytes and launches of everything run inside `with counter:`."""

    def __init__(self):
        super().__init__()
        self.traffic = Traffic()
        self.trace: list | None = None  # set to a list to record the name of every counted aten op
        self._launch: _Launch | None = None
        self._uncounted = False
        self._stacks: list[contextlib.ExitStack] = []

    # -- aten ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "acn_kernels":
            # Run the op's Python body with this mode on, so the aten ops inside it count too.
            implementation = torch._library.custom_ops.OPDEFS[func._schema.name]._init_fn
            with self:
                return implementation(*args, **kwargs)
        out = func(*args, **kwargs)
        counted = self._launch is None and not self._uncounted
        if counted and not func.is_view and func.__name__.split(".")[0] not in ALLOCATIONS:
            read, written = _unique_bytes(tree_leaves((args, kwargs))), _unique_bytes(tree_leaves(out))
            if read or written:
                if self.trace is not None:
                    self.trace.append(func.__name__)
                self.traffic.read += read
                self.traffic.written += written
                self.traffic.launches += 1
        return out

    # -- Triton kernels under the interpreter
    def _record(self, kind: str, ptrs, mask=None):
        if self._launch is None:
            return
        addresses = ptrs.data if mask is None else ptrs.data[mask.data]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        getattr(self._launch, kind)[size].append(np.asarray(addresses).ravel())

    @contextlib.contextmanager
    def _patched_interpreter(self):
        from triton.runtime import interpreter

        builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
        originals = {name: getattr(builder, name) for name in
                     ("create_load", "create_masked_load", "create_store", "create_masked_store")}
        original_call = executor.__call__
        counter = self

        def load(b, ptr, *rest):
            counter._record("loads", ptr)
            return originals["create_load"](b, ptr, *rest)

        def masked_load(b, ptrs, mask, *rest):
            counter._record("loads", ptrs, mask)
            return originals["create_masked_load"](b, ptrs, mask, *rest)

        def store(b, ptr, value, *rest):
            counter._record("stores", ptr)
            return originals["create_store"](b, ptr, value, *rest)

        def masked_store(b, ptrs, value, mask, *rest):
            counter._record("stores", ptrs, mask)
            return originals["create_masked_store"](b, ptrs, value, mask, *rest)

        def launch(grid_executor, *args, **kwargs):
            counter._launch = _Launch()
            try:
                return original_call(grid_executor, *args, **kwargs)
            finally:
                counter.count_launch(_Launch._bytes(counter._launch.loads), _Launch._bytes(counter._launch.stores))
                counter._launch = None

        patches = {"create_load": load, "create_masked_load": masked_load, "create_store": store,
                   "create_masked_store": masked_store}
        for name, fn in patches.items():
            setattr(builder, name, fn)
        executor.__call__ = launch
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(builder, name, fn)
            executor.__call__ = original_call

    def count_launch(self, read: int, written: int) -> None:
        """A kernel launch that aten does not see (the host-executed CUDA kernels)."""
        self.traffic.read += read
        self.traffic.written += written
        self.traffic.launches += 1

    @contextlib.contextmanager
    def uncounted(self):
        """Runs aten ops without counting them (the work of a kernel counted as a whole)."""
        before, self._uncounted = self._uncounted, True
        try:
            yield
        finally:
            self._uncounted = before

    def __enter__(self):
        stack = contextlib.ExitStack()
        if not self._stacks:  # re-entered to count inside one of this package's ops: patched already
            stack.enter_context(self._patched_interpreter())
            stack.enter_context(_rms_norm_as_one_kernel())
        self._stacks.append(stack)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stacks.pop().close()


class _FusedRMSNorm(torch.autograd.Function):
    """F.rms_norm as one counted kernel each way (CUDA's _fused_rms_norm), computed by torch's own."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        counter = _get_current_dispatch_mode()
        ctx.leaves = [x.detach().requires_grad_(), None if weight is None else weight.detach().requires_grad_()]
        with counter.uncounted(), torch.enable_grad():
            ctx.out = _TORCH_RMS_NORM(ctx.leaves[0], normalized_shape, ctx.leaves[1], eps)
        ctx.rows = x.numel() // max(math.prod(normalized_shape), 1)
        counter.count_launch(_unique_bytes((x, weight)), _unique_bytes((ctx.out,)) + 4 * ctx.rows)
        return ctx.out.detach()

    @staticmethod
    def backward(ctx, dout):
        counter = _get_current_dispatch_mode()
        wrt = [leaf for leaf in ctx.leaves if leaf is not None]
        with counter.uncounted():
            grads = torch.autograd.grad(ctx.out, wrt, dout)
        counter.count_launch(_unique_bytes((dout, *wrt)) + 4 * ctx.rows, _unique_bytes(grads))
        return grads[0], None, grads[1] if len(grads) > 1 else None, None


_TORCH_RMS_NORM = F.rms_norm


def _counted_rms_norm(x, normalized_shape, weight=None, eps=None):
    return _FusedRMSNorm.apply(x, tuple(normalized_shape), weight, eps)


@contextlib.contextmanager
def _rms_norm_as_one_kernel():
    before, F.rms_norm = F.rms_norm, _counted_rms_norm
    try:
        yield
    finally:
        F.rms_norm = before


def measure(fn, inputs) -> tuple[Traffic, Traffic]:
    """(forward, backward) traffic of fn(*inputs) and of the gradients of every input that requires
    them. torch.autograd.grad returns the gradients: no accumulation into .grad is counted."""
    with TrafficCounter() as counter:
        outputs = fn(*inputs)
    forward = counter.traffic
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    outputs = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
    out_grads = [torch.randn_like(o) for o in outputs]
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    with TrafficCounter() as counter:
        torch.autograd.grad(outputs, wrt, out_grads, allow_unused=True)
    return forward, counter.traffic


# ----------------------------------------------------------------------------- the report

def _leaf(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype).requires_grad_()


def with_positional_long_weight(op):
    """The hybrid op (or its reference) with the long weight positional, so that its gradient counts."""
    def hybrid_accumulate_norm(x, f, y, gate, weight, bias, long_weight, **kwargs):
        return op(x, f, y, gate, weight, bias, long_weight=long_weight, **kwargs)
    return hybrid_accumulate_norm


def op_cases(rows: int = 512, dim: int = 1024, depth: int = 6):
    """(name, fused op, its reference, inputs, kwargs, docstring bound) for each op at one size."""
    from .. import reference
    from ..ops import accumulate_norm, feed_forward, hybrid_accumulate_norm, linear, linear_act_accumulate, probe_norm
    from ..ops.accumulate_norm import traffic_bound as norm_bound
    from ..ops.feed_forward import traffic_bound as feed_forward_bound
    from ..ops.hybrid_accumulate_norm import traffic_bound as hybrid_bound
    from ..ops.linear import traffic_bound as plain_linear_bound
    from ..ops.linear_act_accumulate import traffic_bound as linear_bound
    from ..ops.probe_norm import traffic_bound as probe_bound

    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        x, y, w, b = _leaf(rows, dim, dtype=dtype), _leaf(rows, dim, dtype=dtype), _leaf(dim), _leaf(dim)
        for normalize in ("input", "sum"):
            kwargs = {"normalize": normalize}
            cases.append((f"accumulate_norm {normalize} {tag}", accumulate_norm, reference.accumulate_norm,
                          (x, y, w, b), kwargs, norm_bound(x, y, w, b, **kwargs)))
        f, gate = _leaf(rows, dim, dtype=dtype), _leaf()
        for long_weight in (None, _leaf()):
            cases.append((f"hybrid_accumulate_norm{' long weight' if long_weight is not None else ''} {tag}",
                          with_positional_long_weight(hybrid_accumulate_norm),
                          with_positional_long_weight(reference.hybrid_accumulate_norm),
                          (x, f, y, gate, w, b, long_weight), {}, hybrid_bound(x, f, y, gate, w, b,
                                                                                long_weight=long_weight)))
        xs = _leaf(depth, rows // depth, dim, dtype=dtype)
        cases.append((f"probe_norm L+1={depth} {tag}", probe_norm, reference.probe_norm, (xs, w, b), {},
                      probe_bound(xs, w, b)))
        xl, wl, bl, yl = _leaf(rows, dim // 4, dtype=dtype), _leaf(dim // 4, dim // 4, dtype=dtype), \
            _leaf(dim // 4, dtype=dtype), _leaf(rows, dim // 4, dtype=dtype)
        cases.append((f"linear_act_accumulate gelu {tag}", linear_act_accumulate, reference.linear_act_accumulate,
                      (xl, wl, bl, yl), {"activation": "gelu"}, linear_bound(xl, wl, bl, yl, activation="gelu")))
        w2 = _leaf(dim // 8, dim // 4, dtype=dtype)
        b2 = _leaf(dim // 8, dtype=dtype)
        args = (xl, wl, bl, w2, b2)
        cases.append((f"feed_forward gelu {tag}", feed_forward, reference.feed_forward, args, {"activation": "gelu"},
                      feed_forward_bound(*args, activation="gelu")))
        w_gated, b_gated = _leaf(dim // 2, dim // 4, dtype=dtype), _leaf(dim // 2, dtype=dtype)  # (gate, up) rows
        args = (xl, w_gated, b_gated, w2, b2)
        cases.append((f"feed_forward swiglu {tag}", feed_forward, reference.feed_forward, args,
                      {"activation": "swiglu"}, feed_forward_bound(*args, activation="swiglu")))
        cases.append((f"linear {tag}", linear, reference.linear, (xl, wl, bl), {}, plain_linear_bound(xl, wl, bl)))
        cases.append(depth_cross_entropy_case(rows, dim, depth, dtype, tag))
    return cases


def depth_cross_entropy_case(rows: int, dim: int, exits: int, dtype: torch.dtype, tag: str):
    """depth_cross_entropy at `exits` exits of rows // exits tokens, states of width dim // 4, a
    vocabulary of 2 dim, the layernorm and a head bias; chunks of one exit's rows."""
    from .. import reference
    from ..ops import depth_cross_entropy
    from ..ops.depth_cross_entropy import traffic_bound
    from .cases import depth_loss

    tokens, width, vocab = rows // exits, dim // 4, 2 * dim
    args = (_leaf(exits, tokens, width, dtype=dtype), torch.randint(0, vocab, (tokens,)), _leaf(width, dtype=dtype),
            _leaf(width, dtype=dtype), _leaf(vocab, width, dtype=dtype), torch.rand(exits), _leaf(vocab, dtype=dtype))
    fused = depth_loss(depth_cross_entropy)
    fused.__name__ = "depth_cross_entropy"  # its CUDA twin's name in cuda_host_ops

    def unchunked(*inputs, chunk_rows):  # the reference materializes every logit: no chunks
        return depth_loss(reference.depth_cross_entropy)(*inputs)
    return (f"depth_cross_entropy E={exits} V={vocab} {tag}", fused, unchunked, args, {"chunk_rows": tokens},
            traffic_bound(*args, chunk_rows=tokens))


def liger_swiglu_bytes(x, w1, b1, w2, b2) -> tuple[int, int]:
    """(forward, backward) bytes of an MLP as Liger-Kernel runs SwiGLU: cuBLAS writes z = (gate, up),
    one fused elementwise kernel reads z and writes h, and in backward reads dh and z and writes dz
    (recomputing silu), cuBLAS around it and a sum for each bias: the anchor for feed_forward's swiglu."""
    rows_w1, dim = w1.shape
    hidden, out_features = rows_w1 // 2, w2.shape[0]
    m, e = x.numel() // dim, x.element_size()
    a, x_b, out_b = m * hidden * e, m * dim * e, m * out_features * e
    w1_b, w2_b, b1_b, b2_b = w1.numel() * e, w2.numel() * e, b1.numel() * e, b2.numel() * e
    forward = (x_b + w1_b + b1_b + 2 * a) + (2 * a + a) + (a + w2_b + b2_b + out_b)
    backward = (out_b + w2_b + a) + (out_b + a + w2_b) + (out_b + b2_b) + (a + 2 * a + 2 * a) \
        + (2 * a + w1_b + x_b) + (2 * a + x_b + w1_b) + (2 * a + b1_b)
    return forward, backward


# The CUDA backend's partial rows, like the Triton count's: 2 programs per SM on a 4-SM device = 8.
CUDA_HOST_SMS = 4


@functools.cache
def cuda_host_ops() -> dict | None:
    """The public ops on the CUDA kernels executed on the CPU (tools/cuda_host_check.py), each kernel
    launch counting into the active TrafficCounter with the bytes the host execution counted; None
    where no host compiler or CUDA headers are found."""
    from .cuda_host_check import HostKernels, HostOps, Placement, public_ops, toolchain
    if isinstance(toolchain(), str):
        return None
    kernels = HostKernels.load(placement=Placement(checked=False), sm_count=CUDA_HOST_SMS)
    kernels.on_launch = lambda launch: _get_current_dispatch_mode().count_launch(launch.bytes_read,
                                                                                  launch.bytes_written)
    return public_ops(HostOps(kernels))


def op_row(index: int, total: int | None = None) -> dict:
    """Op case `index` of op_cases(): (forward, backward) Traffic of eager, triton, cublas (the GEMM ops;
    the norm ops' is triton's) and cuda (the host-executed kernels; feed_forward and linear have no CUDA
    twin), None where a backend has no row of its own."""
    from ..backend import GEMM_OPS

    cases = op_cases()
    name, fused, ref, inputs, kwargs, bound = cases[index]
    progress("ops", index, total or len(cases), name)
    cuda = cuda_host_ops()
    cuda_op = cuda.get(fused.__name__) if cuda else None
    runs = {"eager": lambda *a: ref(*a, **kwargs), "triton": lambda *a: fused(*a, backend="triton", **kwargs),
            "cublas": (lambda *a: fused(*a, backend="cublas", **kwargs)) if fused.__name__ in GEMM_OPS else None,
            "cuda": (lambda *a: cuda_op(*a, **kwargs)) if cuda_op else None}
    return dict(name=name, bound=bound, **{impl: measure(run, inputs) if run else None for impl, run in runs.items()})


def model_cases():
    from ..models import GPT, MLP, Encoder, Mixer, ViT

    def make(cls, *args, **kwargs):
        return lambda backend, connectivity: cls(*args, connectivity=connectivity, backend=backend, **kwargs)
    return [
        ("MLP", make(MLP, 64, 128, 6, 10), lambda: torch.randn(64, 64)),
        ("Mixer", make(Mixer, 16, 4, 3, 64, 6, 32, 128, 10), lambda: torch.randn(16, 3, 16, 16)),
        ("ViT", make(ViT, 16, 4, 3, 64, 6, 2, 128, 10), lambda: torch.randn(16, 3, 16, 16)),
        ("Encoder", make(Encoder, 100, 32, 64, 6, 2, 128, 2), lambda: torch.randint(0, 100, (16, 32))),
        ("GPT", make(GPT, 256, 32, 64, 6, 2), lambda: torch.randint(0, 256, (16, 32))),
        ("GPT-swiglu", make(GPT, 256, 32, 64, 6, 2, norm="rmsnorm", mlp="swiglu", positions="rotary"),
         lambda: torch.randint(0, 256, (16, 32))),
    ]


def progress(table: str, done: int, total: int, name: str) -> None:
    """One line per row on stderr (the tables go to stdout, and into docs pages): a run takes minutes."""
    print(f"traffic: {table} {done + 1}/{total}: {name}", file=sys.stderr, flush=True)


def step_traffic(model, inputs) -> Traffic:
    """Forward and backward of one training step's loss, for every parameter."""
    forward, backward = measure(lambda *params: model(inputs).float().logsumexp(-1).mean(),
                                tuple(model.parameters()))
    return Traffic(forward.read + backward.read, forward.written + backward.written,
                   forward.launches + backward.launches)


STEP_DTYPES = (torch.float32, torch.bfloat16)


def model_keys(dtypes=STEP_DTYPES, names=None, connectivities=None) -> list:
    """(model, dtype, connectivity) of every training-step row, in the table's order."""
    from ..models import CONNECTIVITIES

    return [(name, dtype, connectivity) for name, _, _ in model_cases() if names is None or name in names
            for dtype in dtypes for connectivity in connectivities or CONNECTIVITIES]


def model_row(key: tuple, index: int = 0, total: int = 1) -> dict:
    """One training step of a model, dtype and connectivity, eager (backend="reference"), fused
    (backend="triton") and fused with cuBLAS GEMMs (backend="cublas", auto's default on a GPU), from the
    same initialization and batch."""
    name, dtype, connectivity = key
    _, make, inputs = next(case for case in model_cases() if case[0] == name)
    progress("training steps", index, total, f"{name} {str(dtype).removeprefix('torch.')} {connectivity}")
    torch.manual_seed(0)
    batch = inputs()
    batch = batch.to(dtype) if batch.is_floating_point() else batch
    steps = {backend: step_traffic(make(backend, connectivity).to(dtype), batch)
             for backend in ("reference", "triton", "cublas")}
    return dict(name=name, dtype=dtype, connectivity=connectivity, eager=steps["reference"], fused=steps["triton"],
                cublas=steps["cublas"])


def model_rows(dtypes=STEP_DTYPES, names=None, connectivities=None) -> list:
    """model_row of every model, dtype and connectivity (or those named), in this process."""
    keys = model_keys(dtypes, names, connectivities)
    return [model_row(key, i, len(keys)) for i, key in enumerate(keys)]


def _on_one_thread(fn, arguments: tuple):
    torch.set_num_threads(1)  # each of the pool's processes keeps one core
    return fn(*arguments)


def in_processes(work: list, jobs: int) -> list:
    """fn(*arguments) for each (fn, arguments) of `work`, in order, in `jobs` fresh processes of one
    thread each (under Triton's interpreter, as this one is); in this process where jobs is 1."""
    if jobs == 1 or not work:
        return [fn(*arguments) for fn, arguments in work]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_on_one_thread, *zip(*work)))


def twin_cost(rows, row) -> float:
    """A long-connection step's fused bytes (acn or hybrid) over its ffn twin's (same model, dtype, backend)."""
    ffn = next(r for r in rows if (r["name"], r["dtype"], r["connectivity"]) == (row["name"], row["dtype"], "ffn"))
    return row["fused"].total / ffn["fused"].total


def _mb(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def print_swiglu_anchor(ops, cases) -> None:
    """feed_forward's fused swiglu against Liger-Kernel's design, in bytes."""
    for row, case in zip(ops, cases):
        if row["name"].startswith("feed_forward swiglu"):
            forward, backward = liger_swiglu_bytes(*case[3])
            fused = sum(t.total for t in row["triton"])
            print(f"{row['name']}: fused {_mb(fused).strip()} MiB against {_mb(forward + backward).strip()} MiB as "
                  f"Liger-Kernel runs it (cuBLAS, one elementwise SwiGLU kernel each way, cuBLAS): "
                  f"{fused / (forward + backward):.2f}")


OP_IMPLS = ("eager", "triton", "cublas", "cuda")


def print_op_table(ops) -> None:
    print("Per op, one call forward and backward (MiB; launches in brackets). triton: the Triton kernels under "
          "the interpreter; cublas: the GEMM ops' cuBLAS path (auto's default on a GPU); cuda: the CUDA kernels "
          "executed on the CPU (cuda-host-check); 8 programs' partial rows:")
    print(f"{'op':<34} " + " ".join(f"{impl + ' ' + way:>14}" for way in ("fwd", "bwd") for impl in OP_IMPLS)
          + " " + " ".join(f"{impl + '/eager':>12}" for impl in OP_IMPLS[1:]) + f" {'docstring bound':>16}")
    for r in ops:
        eager_total = sum(t.total for t in r["eager"])
        cells = [f"{_mb(r[impl][way].total)} [{r[impl][way].launches:>2}]" if r[impl] else "n/a"
                 for way in (0, 1) for impl in OP_IMPLS]
        ratios = [f"{sum(t.total for t in r[impl]) / eager_total:.2f}" if r[impl] else "n/a" for impl in OP_IMPLS[1:]]
        print(f"{r['name']:<34} " + " ".join(f"{c:>14}" for c in cells) + " " + " ".join(f"{c:>12}" for c in ratios)
              + f" {_mb(r['bound'][0]) + ' +' + _mb(r['bound'][1]):>16}")


def print_model_table(models) -> None:
    print("One training step (forward and backward, every parameter's gradient) of small models, eager against "
          "fused (triton) and fused with cuBLAS GEMMs (cublas; MiB [launches]); /ffn twin: the acn (or hybrid) "
          "step's triton bytes over its ffn twin's:")
    print(f"{'model':<10} {'dtype':<9} {'twin':<9} {'eager':>16} {'triton':>16} {'cublas':>16} {'bytes':>6} "
          f"{'launches':>9} {'cublas bytes':>12} {'launches':>9} {'/ffn twin':>9}")
    for r in models:
        e, f, c = r["eager"], r["fused"], r["cublas"]
        cost = f"{twin_cost(models, r):.2f}" if r["connectivity"] in ("acn", "hybrid") else ""
        print(f"{r['name']:<10} {str(r['dtype']).removeprefix('torch.'):<9} {r['connectivity']:<9} "
              + " ".join(f"{_mb(t.total) + f' [{t.launches}]':>16}" for t in (e, f, c))
              + f" {f.total / e.total:>6.2f} {f.launches / e.launches:>9.2f} {c.total / e.total:>12.2f} "
              f"{c.launches / e.launches:>9.2f} {cost:>9}")


def run_traffic(only: str | None = None, model: str | None = None, jobs: int | None = None) -> int:
    """The op table (`only` the ops whose name starts with it) and the training-step table (`model` that
    model's rows alone), their rows measured in `jobs` processes (default: every core); with a filter,
    only the table it filters."""
    from ..backend import TRITON_INTERPRETED

    if not TRITON_INTERPRETED:
        raise RuntimeError("the traffic model counts the Triton kernels' loads and stores under Triton's "
                           "interpreter: run it with TRITON_INTERPRET=1")
    jobs = jobs or os.cpu_count() or 1
    cases = op_cases()
    names = {"--only": (only, [case[0] for case in cases]), "--model": (model, [case[0] for case in model_cases()])}
    for option, (given, known) in names.items():
        if given is not None and not any(name.startswith(given) if option == "--only" else name == given
                                         for name in known):
            print(f"python -m acn_kernels traffic: {option} must name one of {sorted({n.split()[0] for n in known})}, "
                  f"got {given!r}", file=sys.stderr)
            return 2
    chosen = [i for i, case in enumerate(cases) if case[0].startswith(only or "")] if model is None or only else []
    keys = model_keys(names=None if model is None else (model,)) if only is None or model else []
    work = [(op_row, (i, len(cases))) for i in chosen] + [(model_row, (key, i, len(keys))) for i, key in
                                                          enumerate(keys)]
    rows = in_processes(work, jobs)
    ops, models = rows[:len(chosen)], rows[len(chosen):]
    if ops:
        print_op_table(ops)
    if ops and models:
        print()
    if models:
        print_model_table(models)
    if ops:
        print()
        print_swiglu_anchor(ops, [cases[i] for i in chosen])
    return 0
