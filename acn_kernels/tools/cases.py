"""The cases every backend's checks draw from: an op, a dtype, a row width, a row count, pointers
aligned or shifted, the op's options, and the GPU shape the launchers see (SM count, target).

`cuda-host-check` runs a fixed grid of them and, with `--fuzz`, random ones (`draw_case` with
Python's seeded generator); the test suite draws them with hypothesis (`draw_case` with its
strategies), on the Triton kernels under the interpreter and on the CUDA kernels through the host
layer. `case_inputs` turns a case into fresh random inputs and the reference that is their spec.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..ops._gemm import GATED
from ..ops._gemm import ACTIVATIONS

KERNEL_OPS = ("accumulate_norm", "hybrid_accumulate_norm", "probe_norm", "linear_act_accumulate",  # both backends
              "depth_cross_entropy")
GEMM_OPS = ("linear", "feed_forward")  # Triton kernels; the CUDA backend runs cuBLAS for these
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGETS = (80, 90)  # sm_80 (A100) and sm_90 (H100, H200): their shared-memory limits differ
MAX_WIDTH, MAX_ROWS, MAX_SMS = 20000, 64, 132
# CI's randomized tests stop at the largest path edge below about 4100 (4097: past the 16-bit backward
# registers' 4096); the fuzz runs (gpu_check.sh --fuzz, HYPOTHESIS_PROFILE=fuzz, cuda-host-check --fuzz)
# reach MAX_WIDTH, where an interpreted GEMM case takes about 50 s.
CI_MAX_WIDTH = 4097
# Widths at the edges of every kernel path, and one past: pack counts a thread holds, the register
# kernels' capacity (backward 8192, forward 8192 float32 or 16384 16-bit with packs; 2048 elements on
# the scalar path), the probe's backward float rows in each target's opt-in shared memory (8345/8346 on
# sm_80, 11622/11623 on sm_90; its forward rows leave sm_80's at 20865, past these widths).
EDGES = (1, 2, 3, 7, 8, 9, 31, 32, 33, 511, 512, 513, 2047, 2048, 2049, 4095, 4096, 4097, 8191, 8192, 8193,
         8345, 8346, 11622, 11623, 12288, 16383, 16384, 16385, MAX_WIDTH)


@dataclass(frozen=True)
class Case:
    op: str
    dtype: torch.dtype
    width: int
    shift: int            # 1: every pointer one element past 16-byte alignment (the scalar paths)
    options: tuple = ()
    rows: int = 5         # more rows than the two backward programs of a one-SM device: the persistent loop
    sm_count: int = 1
    target: int = 90

    def __str__(self) -> str:
        options = " ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.op} {str(self.dtype).replace('torch.', '')} D={self.width} rows={self.rows} " \
               f"{'misaligned' if self.shift else 'aligned'} sm_{self.target} {self.sm_count} SMs {options}"


def op_options(op: str, dtype: torch.dtype) -> list[tuple]:
    """Every option combination a case of `op` in `dtype` can take."""
    running_sums = ("none", "same") + (("float32",) if dtype != torch.float32 else ())
    norms = (("layernorm", True), ("rmsnorm", False))
    if op == "accumulate_norm":
        return [(("y", y), ("normalize", normalize), ("norm", norm), ("bias", bias))
                for y, normalize, (norm, bias) in itertools.product(running_sums, ("input", "sum"), norms)
                if not (y == "none" and normalize == "sum")]  # the same launch as normalize="input" without y
    if op == "hybrid_accumulate_norm":
        return [(("y", y), ("long_weight", long_weight), ("norm", norm), ("bias", bias))
                for y, long_weight, (norm, bias) in itertools.product(running_sums, (False, True), norms)]
    if op == "probe_norm":
        return [(("norm", norm), ("bias", bias), ("terms", terms))
                for (norm, bias), terms in itertools.product(norms, ("random", "cancel"))]
    if op == "depth_cross_entropy":  # the width is the vocabulary: the row kernels' length
        return [(("norm", "layernorm"), ("label_smoothing", 0.0), ("z_loss", 0.0), ("softcap", None)),
                (("norm", "layernorm"), ("label_smoothing", 0.1), ("z_loss", 1e-3), ("softcap", None)),
                (("norm", "layernorm"), ("label_smoothing", 0.0), ("z_loss", 0.0), ("softcap", 4.0)),
                (("norm", "rmsnorm"), ("label_smoothing", 0.2), ("z_loss", 1e-2), ("softcap", 2.5)),
                (("norm", "layernorm"), ("label_smoothing", 0.1), ("z_loss", 1e-3), ("softcap", 4.0),
                 ("statistics", True))]  # the split pass: its statistics, then its gradient
    if op == "linear":
        return [(("bias", True),), (("bias", False),)]
    if op == "feed_forward":
        return [(("activation", activation), ("bias", bias)) for activation, bias in
                itertools.product(ACTIVATIONS, (True, False))]
    return [(("activation", activation), ("y", y)) for activation, y in itertools.product(ACTIVATIONS, running_sums)]


def draw_case(op: str, integer: Callable[[int, int], int], choice: Callable[[Sequence], object],
              max_width: int = MAX_WIDTH) -> Case:
    """One case of `op` from the two draws given (`integer(low, high)` inclusive, `choice(options)`):
    half the widths at a path's edge, half log-uniform in 1..max_width, and half of each rounded up to
    a multiple of 8 (the packed paths); 1..MAX_ROWS rows, 1..MAX_SMS SMs, either target and alignment,
    any dtype and options."""
    if choice((True, False)):
        width = choice([edge for edge in EDGES if edge <= max_width])
    else:
        width = round(math.exp(integer(0, 1000) / 1000 * math.log(max_width)))
    if choice((True, False)):
        width = min(-(-width // 8) * 8, max_width)
    dtype = choice(DTYPES)
    return Case(op, dtype, width, choice((0, 1)), choice(op_options(op, dtype)), rows=integer(1, MAX_ROWS),
                sm_count=integer(1, MAX_SMS), target=choice(TARGETS))


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape) * scale).to(dtype)


def case_inputs(case: Case):
    """(reference function, arguments, keyword arguments) of a case: fresh random inputs, the
    hybrid op's long weight positional (so that its gradient is checked)."""
    from .. import reference

    o, d, width, rows = dict(case.options), case.dtype, case.width, case.rows
    y = None if "y" not in o else {"none": None, "same": _randn(rows, width, dtype=d, scale=3),
                                   "float32": _randn(rows, width, scale=3)}[o["y"]]
    if case.op == "accumulate_norm":
        args = (_randn(rows, width, dtype=d, scale=2) + 0.5, y, _randn(width), _randn(width) if o["bias"] else None)
        return reference.accumulate_norm, args, {"norm": o["norm"], "normalize": o["normalize"]}
    if case.op == "hybrid_accumulate_norm":
        args = (_randn(rows, width, dtype=d, scale=2), _randn(rows, width, dtype=d) + 0.5, y, _randn(),
                _randn(width), _randn(width) if o["bias"] else None, _randn() + 1 if o["long_weight"] else None)
        return hybrid_reference, args, {"norm": o["norm"]}
    if case.op == "probe_norm":
        xs = _randn(3, rows, width, scale=2)
        if o["terms"] == "cancel":  # y_1 ~ 1e-5 of its terms, rebuilt in backward as y_2 - x_2 (x_2 large)
            xs[1], xs[2] = -xs[0] + 1e-5 * torch.randn(rows, width), xs[2] * 8
        args = (xs.to(d), _randn(width), _randn(width) if o["bias"] else None)
        return reference.probe_norm, args, {"norm": o["norm"]}
    if case.op == "depth_cross_entropy":
        return depth_cross_entropy_inputs(case)
    k = 24  # the GEMMs' inner size: the width is their output's (the hidden width for feed_forward)
    if case.op == "linear":
        args = (_randn(rows, k, dtype=d), _randn(width, k, dtype=d, scale=k ** -0.5),
                _randn(width, dtype=d) if o["bias"] else None)
        return reference.linear, args, {}
    rows_w = 2 * width if o["activation"] in GATED else width  # swiglu: (gate, up) rows
    w1 = _randn(rows_w, k, dtype=d, scale=3 * k ** -0.5)
    b1 = _randn(rows_w, dtype=d) if o.get("bias", True) else None
    if case.op == "feed_forward":
        w2 = _randn(k, width, dtype=d, scale=width ** -0.5)
        args = (_randn(rows, k, dtype=d), w1, b1, w2, _randn(k, dtype=d) if o["bias"] else None)
        return reference.feed_forward, args, {"activation": o["activation"]}
    return reference.linear_act_accumulate, (_randn(rows, k, dtype=d), w1, b1, y), {"activation": o["activation"]}


def hybrid_reference(x, f, y, gate, weight, bias, long_weight, **kwargs):
    """The reference with the long weight positional."""
    from .. import reference
    return reference.hybrid_accumulate_norm(x, f, y, gate, weight, bias, long_weight=long_weight, **kwargs)


DEPTH_EXITS, DEPTH_STATE_WIDTH = 3, 24
DEPTH_CHUNK_ROWS = 7  # fewer than most cases' rows (3 exits x rows): several chunks, a partial last one


def depth_cross_entropy_inputs(case: Case):
    """A depth_cross_entropy case: 3 exits of `rows` tokens, states of width 24, the case's width the
    vocabulary, a quarter of the targets ignored, the loss alone (depth_loss)."""
    from .. import reference

    o, d, vocab, dim = dict(case.options), case.dtype, case.width, DEPTH_STATE_WIDTH
    targets = torch.randint(0, vocab, (case.rows,))
    targets[torch.rand(case.rows) < 0.25] = -100
    args = (_randn(DEPTH_EXITS, case.rows, dim, dtype=d, scale=2), targets, (1 + _randn(dim, scale=0.1)).to(d),
            _randn(dim, dtype=d, scale=0.1) if o["norm"] == "layernorm" else None,
            _randn(vocab, dim, dtype=d, scale=dim ** -0.5), torch.rand(DEPTH_EXITS) + 0.1, _randn(vocab, dtype=d,
                                                                                                   scale=0.1))
    return depth_loss(reference.depth_cross_entropy), args, o


def depth_loss(op, **fixed):
    """depth_cross_entropy's loss (what compare_op differentiates) and, with statistics=True, the (3, E)
    statistics, the exits' weights and the head bias positional, `fixed` keywords (a chunk size) added to
    the call."""
    def loss(states, targets, norm_weight, norm_bias, head_weight, weights, head_bias, **options):
        outputs = op(states, targets, norm_weight, norm_bias, head_weight, weights=weights, head_bias=head_bias,
                     **options, **fixed)
        return (outputs[0], torch.stack(list(outputs[2]))) if options.get("statistics") else outputs[0]
    return loss
