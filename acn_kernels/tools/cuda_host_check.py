"""`python -m acn_kernels cuda-host-check`: the CUDA kernels of csrc/ executed on the CPU.

The `.cu` files are compiled, unmodified, with the host C++ compiler through the SIMT execution layer
of csrc/host/ (one fiber per CUDA thread, block barriers, checked warp shuffles, shared memory; see
simt.h), and launched through the host entry points of kernels.h, the same code that picks the grid,
the block size and the pack width on a GPU. `HostOps` mirrors csrc/bindings.cpp (its allocations and
the cuBLAS GEMMs, which torch runs here), its launch plan (the number of backward programs, the partial
rows' widths and sums, the probe's scratch) computed by csrc/launch_plan.h itself, as the extension
computes it; and
the ops run through each op module's registered autograd formula and public-function tail, so every
case checks forward and backward of what `backend="cuda"` runs against `acn_kernels.reference` with
the tests' tolerance rule.

Every buffer a kernel sees is NaN-filled where it is an output and sits between guard bytes; the
layer reports an access to a guard (out of bounds), a store into an input, and what CUDA leaves
undefined (a barrier some threads skip, a shuffle mask that leaves out its caller, a deadlock).
It also counts the distinct bytes each launch loads and stores, which `traffic` prints beside the
Triton kernels' counts.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import itertools
import os
import random
import pathlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..ops._gemm import GATED, output_width, saves_preactivation
from ..ops._gemm import ACTIVATIONS  # row_math.h's codes, in order
from .cache import cache_dir, digest, file_digest
from .cases import Case, DEPTH_CHUNK_ROWS, DTYPES, KERNEL_OPS, case_inputs, depth_loss, draw_case, op_options

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # kernels.h's DType
GUARD_BYTES = 64


def guard_bytes(nbytes: int) -> int:
    """The guard on each side of a buffer: GUARD_BYTES, or as many bytes as the buffer holds where that is
    more, so that an overrun of up to its own size lands in a guard (reported), not in other memory."""
    return max(GUARD_BYTES, nbytes)
FP32_RTOL = 1e-5  # the host computes exact float32, as the interpreter does


# ----------------------------------------------------------------------------- the build

def toolchain() -> tuple[str, pathlib.Path] | str:
    """(C++ compiler, CUDA include directory), or why the check cannot run here."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if compiler is None:
        return "no host C++ compiler (g++) on PATH"
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for root in filter(None, roots):
        include = pathlib.Path(root) / "include"
        if (include / "cuda_bf16.h").exists() and (include / "driver_types.h").exists():
            return compiler, include
    return "no CUDA headers (cuda_fp16.h, cuda_bf16.h, driver_types.h): set CUDA_HOME to a CUDA toolkit"


def build_library(csrc: pathlib.Path = CSRC, cache: pathlib.Path | None = None) -> pathlib.Path:
    """Compiles csrc/*.cu for the host (instrumented: every load and store reaches the layer's
    counter) with the layer and the C entry points; kept in the cache (tools/cache.py) by the hash of
    the sources, the compiler and its flags."""
    found = toolchain()
    if isinstance(found, str):
        raise RuntimeError(f"cuda-host-check cannot build: {found}")
    compiler, cuda_include = found
    kernels = sorted(csrc.glob("*.cu"))
    runtime = [csrc / "host" / "simt.cpp", csrc / "host" / "host_api.cpp"]
    headers = sorted(csrc.glob("*.h")) + sorted(csrc.glob("*.cuh")) + sorted((csrc / "host").glob("*.h"))
    # the layer's headers first: its cuda_runtime.h stands in for CUDA's
    includes = [f"-I{csrc / 'host'}", f"-I{csrc}", f"-I{cuda_include}"]
    flags = ["-std=c++17", "-O2", "-fPIC", "-DACN_SIMT_HOST"]
    # csrc/'s folder is not in the key: a copy of it elsewhere (the tests' broken kernels) builds the same
    key = digest(compiler, flags, str(cuda_include), file_digest(*kernels, *runtime, *headers))
    library = (cache or cache_dir()) / "cuda-host" / key[:16] / "libacn_host.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        jobs = [[compiler, *flags, *includes, "-fsanitize=thread", "-x", "c++", "-c", str(k), "-o",
                 f"{work}/{k.stem}.o"] for k in kernels]
        jobs += [[compiler, *flags, *includes, "-c", str(r), "-o", f"{work}/{r.stem}.o"] for r in runtime]
        running = [subprocess.Popen(job, stderr=subprocess.PIPE, text=True) for job in jobs]
        for job, process in zip(jobs, running):
            _, errors = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"host build of {job[-3]} failed:\n{errors[-4000:]}")
        staged = library.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([compiler, "-shared", "-o", str(staged), *map(str, sorted(pathlib.Path(work).glob("*.o")))],
                       check=True)
        staged.replace(library)
    return library


# ----------------------------------------------------------------------------- the layer's runtime

PARAMETER_BUFFERS = ("weight", "bias", "mean", "rstd", "partial_rows", "gate", "long_weight", "scratch", "targets",
                     "scale", "loss", "lse")


@dataclass
class Launch:
    name: str
    widths: dict  # buffer -> (widest load, widest store) in bytes
    grid: int
    block: int
    shared: int
    bytes_read: int
    bytes_written: int

    @property
    def kernel(self) -> str:
        return self.name.split("<")[0]

    @property
    def row_access(self) -> int:
        """The widest access to row data (not the norm parameters, statistics or partial rows):
        the pack the launcher chose, in bytes."""
        return max((max(w) for name, w in self.widths.items() if name not in PARAMETER_BUFFERS), default=0)


@dataclass
class Placement:
    """Where the mirror puts a kernel's buffers: `checked` surrounds each with guard bytes,
    NaN-fills outputs and shifts every pointer by `shift` elements (1: no 16-byte alignment, so
    the launchers pick their scalar path); unchecked is what the binding does, for `traffic`."""
    checked: bool = True
    shift: int = 0


# The most dynamic shared memory a block may opt in to, by target (what the binding reads from the
# device as cudaDevAttrMaxSharedMemoryPerBlockOptin): sm_80 (A100) 163 KB, sm_90 (H100, H200) 227 KB.
SHARED_OPT_IN = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class HostKernels:
    """The compiled kernels and the layer's counters; `launches` and `errors` grow with every call.
    `target` is the GPU the layer models (its shared-memory limits), `sm_count` its SMs."""
    library: ctypes.CDLL
    placement: Placement = field(default_factory=Placement)
    sm_count: int = 132
    target: int = 90
    on_launch: Callable[[Launch], None] | None = None  # told of every launch as it ends (traffic)
    launches: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    _keep: list = field(default_factory=list)

    @classmethod
    def load(cls, csrc: pathlib.Path = CSRC, **kwargs) -> "HostKernels":
        library = ctypes.CDLL(str(build_library(csrc)))
        library.acn_simt_register.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong,
                                              ctypes.c_int]
        library.acn_simt_launch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                            ctypes.POINTER(ctypes.c_longlong)]
        library.acn_simt_error.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        library.acn_plan_reduction_programs.argtypes = [ctypes.c_longlong, ctypes.c_int]
        for name in ("acn_plan_partial_width", "acn_plan_partial_sums"):
            getattr(library, name).argtypes = [ctypes.c_longlong, ctypes.c_int, ctypes.c_int]
            getattr(library, name).restype = ctypes.c_longlong
        library.acn_plan_probe_scratch_floats.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong]
        library.acn_plan_probe_scratch_floats.restype = ctypes.c_longlong
        return cls(library, **kwargs)

    def _register(self, name: str, t: torch.Tensor, writable: bool) -> None:
        nbytes = t.numel() * t.element_size()
        self.library.acn_simt_register(name.encode(), t.data_ptr(), nbytes,
                                       guard_bytes(nbytes) if self.placement.checked else 0, int(writable))

    def place(self, name: str, t: torch.Tensor | None, writable: bool = False) -> torch.Tensor | None:
        """t as the kernel reads it: contiguous (as the binding makes it) and, when checked, copied
        between guard bytes at the placement's shift."""
        if t is None:
            return None
        t = t.contiguous()
        if self.placement.checked:
            placed = self.allocate(t.shape, t.dtype)
            placed.copy_(t)
            t = placed
        self._register(name, t, writable)
        return t

    def output(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """A NaN-filled output (when checked), so an element the kernel does not write shows."""
        t = self.allocate(shape, dtype)
        self._register(name, t, True)
        return t

    def allocate(self, shape, dtype: torch.dtype) -> torch.Tensor:
        if not self.placement.checked:
            return torch.empty(shape, dtype=dtype)
        size, element = torch.Size(shape).numel(), torch.tensor([], dtype=dtype).element_size()
        guard = guard_bytes(size * element) // element
        poison = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min  # integers: the targets
        backing = torch.full((size + 2 * guard + self.placement.shift,), poison, dtype=dtype)
        self._keep.append(backing)
        return backing[guard + self.placement.shift: guard + self.placement.shift + size].view(shape)

    @contextlib.contextmanager
    def call(self):
        """One entry point's launches: the buffers registered inside, then their counts and errors."""
        self.library.acn_simt_reset()
        self.library.acn_simt_set_target(self.target)
        try:
            yield
        finally:
            launches = [self._launch(i) for i in range(self.library.acn_simt_launches())]
            for launch in launches if self.on_launch else ():
                self.on_launch(launch)
            self.launches += launches
            self.errors += [self._error(i) for i in range(self.library.acn_simt_errors())]
            self.library.acn_simt_reset()
            self._keep.clear()

    def _launch(self, i: int) -> Launch:
        name, widths, numbers = ctypes.create_string_buffer(256), ctypes.create_string_buffer(1024), \
            (ctypes.c_longlong * 5)()
        self.library.acn_simt_launch(i, name, 256, widths, 1024, numbers)
        fields = (entry.split(":") for entry in widths.value.decode().split())
        return Launch(name.value.decode(), {b: (int(r), int(w)) for b, r, w in fields}, *numbers)

    def _error(self, i: int) -> str:
        text = ctypes.create_string_buffer(600)
        self.library.acn_simt_error(i, text, 600)
        return text.value.decode()

    # The launch plan, csrc/launch_plan.h's functions as bindings.cpp calls them (the host layer exports
    # them): the extension's own arithmetic, not a copy of it.

    def reduction_programs(self, rows: int) -> int:
        return self.library.acn_plan_reduction_programs(rows, self.sm_count)

    def partial_width(self, dim: int, has_bias: bool, scalars: int = 0) -> int:
        return self.library.acn_plan_partial_width(dim, int(has_bias), scalars)

    def partial_sums(self, dim: int, has_bias: bool, scalars: int) -> int:
        return self.library.acn_plan_partial_sums(dim, int(has_bias), scalars)

    def probe_scratch(self, dim: int, backward: bool, programs: int) -> torch.Tensor | None:
        """The probe kernels' float rows in global memory where they do not fit the target's opt-in
        shared memory (NaN-filled, like every output here, so the kernels must set them)."""
        floats = self.library.acn_plan_probe_scratch_floats(dim, int(backward), SHARED_OPT_IN[self.target])
        return self.output("scratch", (programs, floats), torch.float32) if floats else None


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def _code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None else None


def _partial_pointers(partials: torch.Tensor, dim: int, has_bias: bool) -> tuple:
    """The dweight and dbias pointers into (programs, width) partial rows: columns 0 and D."""
    return _ptr(partials), _ptr(partials[:, dim:] if has_bias else None)


# ----------------------------------------------------------------------------- bindings.cpp, mirrored

class HostOps:
    """The ops of csrc/bindings.cpp, with the same schemas, allocations and launch arguments, on
    CPU tensors through the host-compiled kernels."""

    def __init__(self, kernels: HostKernels):
        self.k = kernels

    def accumulate_norm_fwd(self, x, y, weight, bias, eps, is_layernorm, normalize_sum):
        k, dim = self.k, x.shape[-1]
        rows = x.numel() // dim
        with k.call():
            x2, y2 = k.place("x", x.reshape(-1, dim)), k.place("y", y.reshape(-1, dim) if y is not None else None)
            w, b = k.place("weight", weight.float()), k.place("bias", bias.float() if bias is not None else None)
            y_out = k.output("y_out", y2.shape, y.dtype) if y is not None else None
            out = k.output("out", x2.shape, x.dtype)
            mean = k.output("mean", (rows if is_layernorm else 0,), torch.float32)
            rstd = k.output("rstd", (rows,), torch.float32)
            k.library.acn_host_accumulate_norm_forward(
                _code(x.dtype), _code(y.dtype if y is not None else x.dtype), _ptr(x2), _ptr(y2), _ptr(w), _ptr(b),
                _ptr(y_out), _ptr(out), _ptr(mean if is_layernorm else None), _ptr(rstd), ctypes.c_longlong(rows),
                dim, ctypes.c_float(eps), int(normalize_sum))
        return (y_out.view(x.shape) if y is not None else x.new_empty(0), out.view(x.shape),
                mean, rstd)

    def accumulate_norm_bwd(self, dout, dy_out, normalized, weight, mean, rstd, has_bias, is_layernorm, dy_dtype):
        k, dim = self.k, normalized.shape[-1]
        rows = normalized.numel() // dim
        programs = k.reduction_programs(rows)
        width = k.partial_width(dim, has_bias)
        y_dtype = dy_out.dtype if dy_out is not None else (torch.float32 if dy_dtype is not None else dout.dtype)
        with k.call():
            dout2, v2 = k.place("dout", dout.reshape(-1, dim)), k.place("normalized", normalized.reshape(-1, dim))
            dy_out2 = k.place("dy_out", dy_out.reshape(-1, dim) if dy_out is not None else None)
            w, mean_c, rstd_c = k.place("weight", weight.float()), k.place("mean", mean), k.place("rstd", rstd)
            dx = k.output("dx", (rows, dim), dout.dtype)
            dy = k.output("dy", (rows, dim), dy_dtype) if dy_dtype is not None else None
            partials = k.output("partial_rows", (programs, width), torch.float32)
            k.library.acn_host_accumulate_norm_backward(
                _code(dout.dtype), _code(y_dtype), _ptr(dout2), _ptr(dy_out2), _ptr(v2),
                int(normalized.dtype != dout.dtype), _ptr(w), _ptr(mean_c if is_layernorm else None), _ptr(rstd_c),
                _ptr(dx), _ptr(dy), *_partial_pointers(partials, dim, has_bias), ctypes.c_longlong(width),
                ctypes.c_longlong(rows), dim, programs)
        shape = normalized.shape
        return dx.view(shape), dy.view(shape) if dy is not None else dout.new_empty(0), partials.sum(0)

    def hybrid_accumulate_norm_fwd(self, x, f, y, gate, weight, bias, long_weight, eps, is_layernorm):
        k, dim = self.k, x.shape[-1]
        rows = x.numel() // dim
        stores_y = y is not None or long_weight is not None
        with k.call():
            x2, f2 = k.place("x", x.reshape(-1, dim)), k.place("f", f.reshape(-1, dim))
            y2 = k.place("y", y.reshape(-1, dim) if y is not None else None)
            g, lw = k.place("gate", gate.float()), k.place("long_weight", _float(long_weight))
            w, b = k.place("weight", weight.float()), k.place("bias", _float(bias))
            x_next = k.output("x_next", f2.shape, x.dtype)
            y_out = k.output("y_out", f2.shape, y.dtype if y is not None else f.dtype) if stores_y else None
            out = k.output("out", f2.shape, x.dtype)
            mean = k.output("mean", (rows if is_layernorm else 0,), torch.float32)
            rstd = k.output("rstd", (rows,), torch.float32)
            k.library.acn_host_hybrid_accumulate_norm_forward(
                _code(x.dtype), _code(y.dtype if y is not None else x.dtype), _ptr(x2), _ptr(f2), _ptr(y2), _ptr(g),
                _ptr(lw), _ptr(w), _ptr(b), _ptr(x_next), _ptr(y_out), _ptr(out),
                _ptr(mean if is_layernorm else None), _ptr(rstd), ctypes.c_longlong(rows), dim, ctypes.c_float(eps))
        return (x_next.view(x.shape), y_out.view(x.shape) if stores_y else x.new_empty(0), out.view(x.shape), mean,
                rstd)

    def hybrid_accumulate_norm_bwd(self, dout, dx_next, dy_out, x, f, x_next, gate, weight, long_weight, mean, rstd,
                                   has_bias, is_layernorm):
        k, dim = self.k, x_next.shape[-1]
        rows = x_next.numel() // dim
        programs = k.reduction_programs(rows)
        scalars = 1 + (long_weight is not None)
        width = k.partial_width(dim, has_bias, scalars)
        with k.call():
            placed = [k.place(name, t.reshape(-1, dim) if t is not None else None) for name, t in
                      (("dout", dout), ("dx_next", dx_next), ("dy_out", dy_out), ("x", x), ("f", f),
                       ("x_next", x_next))]
            g, lw = k.place("gate", gate.float()), k.place("long_weight", _float(long_weight))
            w, mean_c, rstd_c = k.place("weight", weight.float()), k.place("mean", mean), k.place("rstd", rstd)
            dx, df = k.output("dx", (rows, dim), x.dtype), k.output("df", (rows, dim), f.dtype)
            partials = k.output("partial_rows", (programs, width), torch.float32)
            k.library.acn_host_hybrid_accumulate_norm_backward(
                _code(x_next.dtype), _code(dy_out.dtype if dy_out is not None else x_next.dtype),
                *map(_ptr, placed), _ptr(g), _ptr(lw), _ptr(w), _ptr(mean_c if is_layernorm else None), _ptr(rstd_c),
                _ptr(dx), _ptr(df), _ptr(partials), ctypes.c_longlong(width), int(has_bias), ctypes.c_longlong(rows),
                dim, programs)
        return dx.view(x.shape), df.view(f.shape), partials[:, :k.partial_sums(dim, has_bias, scalars)].sum(0)

    def probe_norm_fwd(self, xs, weight, bias, eps, is_layernorm):
        k, depth, dim = self.k, xs.shape[0], xs.shape[-1]
        rows = xs.numel() // (depth * dim)
        programs = k.reduction_programs(rows)
        with k.call():
            scratch = k.probe_scratch(dim, False, programs)
            xs3, w = k.place("xs", xs), k.place("weight", weight.float())
            b = k.place("bias", bias.float() if bias is not None else None)
            out = k.output("out", xs.shape, xs.dtype)
            mean = k.output("mean", (depth, rows) if is_layernorm else (0,), torch.float32)
            rstd = k.output("rstd", (depth, rows), torch.float32)
            k.library.acn_host_probe_norm_forward(
                _code(xs.dtype), _ptr(xs3), _ptr(w), _ptr(b), _ptr(out), _ptr(mean if is_layernorm else None),
                _ptr(rstd), depth, ctypes.c_longlong(rows), dim, ctypes.c_float(eps), _ptr(scratch), programs)
        return out, mean, rstd

    def probe_norm_bwd(self, dout, xs, weight, mean, rstd, has_bias, is_layernorm):
        k, depth, dim = self.k, xs.shape[0], xs.shape[-1]
        rows = xs.numel() // (depth * dim)
        programs = k.reduction_programs(rows)
        with k.call():
            scratch = k.probe_scratch(dim, True, programs)
            xs3, dout3 = k.place("xs", xs), k.place("dout", dout.to(xs.dtype))
            w, mean_c, rstd_c = k.place("weight", weight.float()), k.place("mean", mean), k.place("rstd", rstd)
            dxs = k.output("dxs", xs.shape, xs.dtype)
            width = k.partial_width(dim, has_bias)
            partials = k.output("partial_rows", (programs, width), torch.float32)
            k.library.acn_host_probe_norm_backward(
                _code(xs.dtype), _ptr(dout3), _ptr(xs3), _ptr(w), _ptr(mean_c if is_layernorm else None),
                _ptr(rstd_c), _ptr(dxs), *_partial_pointers(partials, dim, has_bias), ctypes.c_longlong(width),
                depth, ctypes.c_longlong(rows), dim, programs, _ptr(scratch))
        return dxs, partials.sum(0)

    def linear_act_accumulate_fwd(self, x, weight, bias, y, activation, store_h=True):
        k, act = self.k, ACTIVATIONS.index(activation)
        x2 = x.reshape(-1, x.shape[-1])
        glu_width = output_width(weight, activation) if activation in GATED else 0
        # cuBLAS there; relu with a bias in cuBLASLt's epilogue, identity's h the GEMM's output itself
        relu_epilogue = activation == "relu" and bias is not None
        gemm_epilogue = relu_epilogue or activation == "identity"
        z = torch._addmm_activation(bias, x2, weight.t()) if relu_epilogue \
            else torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        h = z if gemm_epilogue else None
        h_shape = (z.shape[0], glu_width or z.shape[1])
        if y is not None or not gemm_epilogue:
            with k.call():
                z_c, y2 = k.place("z", z), k.place("y", y.reshape(h_shape) if y is not None else None)
                if store_h and not gemm_epilogue:
                    h = k.output("h", h_shape, z.dtype)
                y_out = k.output("y_out", h_shape, y.dtype) if y is not None else None
                k.library.acn_host_activation_epilogue(
                    _code(x.dtype), _code(y.dtype if y is not None else x.dtype), _ptr(z_c), _ptr(y2),
                    _ptr(None if gemm_epilogue else h), _ptr(y_out), ctypes.c_longlong(h_shape[0] * h_shape[1]),
                    ACTIVATIONS.index("identity") if gemm_epilogue else act, ctypes.c_longlong(glu_width))
        shape = (*x.shape[:-1], h_shape[1])
        return (h.view(shape) if store_h else x.new_empty(0), y_out.view(shape) if y is not None else x.new_empty(0),
                z.view(*x.shape[:-1], z.shape[1]) if saves_preactivation(activation, store_h) else x.new_empty(0))

    def activation_backward(self, dh, dy_out, saved, activation, dtype):
        k, like = self.k, (dh if dh is not None else dy_out)
        glu_width = like.shape[-1] if activation in GATED else 0
        with k.call():
            dh_c = k.place("dh", dh.to(dtype) if dh is not None else None)
            dy_c, saved_c = k.place("dy_out", dy_out), k.place("saved", saved)
            dz = k.output("dz", saved.shape if glu_width else like.shape, dtype)
            k.library.acn_host_activation_backward(
                _code(dtype), _code(dy_out.dtype if dy_out is not None else dtype), _ptr(dh_c), _ptr(dy_c),
                _ptr(saved_c), _ptr(dz), ctypes.c_longlong(like.numel()), ACTIVATIONS.index(activation),
                ctypes.c_longlong(glu_width))
        return dz

    def cross_entropy_rows(self, logits, rows_targets, scale, ignore_index, label_smoothing, z_loss, softcap,
                           needs_grad):
        """In place on logits (rows, V) as the extension's op is: the checked copy's result copied back."""
        k, (rows, vocab) = self.k, logits.shape
        with k.call():
            placed = k.place("logits", logits, writable=needs_grad)
            targets, scale_c = k.place("targets", rows_targets.long()), k.place("scale", scale.float())
            loss, lse = k.output("loss", (rows,), torch.float32), k.output("lse", (rows,), torch.float32)
            k.library.acn_host_cross_entropy_rows(
                _ptr(placed), ctypes.c_longlong(placed.stride(0)), _ptr(targets), _ptr(scale_c), _ptr(loss), _ptr(lse),
                ctypes.c_longlong(rows), vocab, ctypes.c_longlong(ignore_index), ctypes.c_float(label_smoothing),
                ctypes.c_float(z_loss), ctypes.c_float(softcap), int(needs_grad))
        if placed.data_ptr() != logits.data_ptr():  # the checked copy (traffic's unchecked placement is in place)
            logits.copy_(placed)
        return loss, lse

    def cross_entropy_statistics(self, logits, local_targets, softcap, entropy):
        k, (rows, vocab) = self.k, logits.shape
        with k.call():
            placed, targets = k.place("logits", logits), k.place("targets", local_targets.long())
            stats, argmax = k.output("stats", (rows, 5), torch.float32), k.output("argmax", (rows,), torch.int64)
            k.library.acn_host_cross_entropy_statistics(
                _ptr(placed), ctypes.c_longlong(placed.stride(0)), _ptr(targets), _ptr(stats), _ptr(argmax),
                ctypes.c_longlong(rows), vocab, ctypes.c_float(softcap))
        return stats, argmax

    def cross_entropy_gradient(self, logits, local_targets, scale, lse, label_smoothing, z_loss, softcap, vocab_size):
        """In place on logits (rows, V), as cross_entropy_rows."""
        k, (rows, vocab) = self.k, logits.shape
        with k.call():
            placed = k.place("logits", logits, writable=True)
            targets, scale_c = k.place("targets", local_targets.long()), k.place("scale", scale.float())
            lse_c = k.place("lse", lse.float())
            k.library.acn_host_cross_entropy_gradient(
                _ptr(placed), ctypes.c_longlong(placed.stride(0)), _ptr(targets), _ptr(scale_c), _ptr(lse_c),
                ctypes.c_longlong(rows), vocab, vocab_size, ctypes.c_float(label_smoothing), ctypes.c_float(z_loss),
                ctypes.c_float(softcap))
        if placed.data_ptr() != logits.data_ptr():
            logits.copy_(placed)


def autograd_twin(forward, backward, make_backward, setup_context):
    """A forward op with the op module's autograd formula, as register_cuda_twin gives the extension's."""
    formula = make_backward(backward)

    class Twin(torch.autograd.Function):
        @staticmethod
        def forward(*inputs):
            return forward(*inputs)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return formula(ctx, *grads)

    return Twin.apply


def public_ops(host: HostOps) -> dict:
    """The public ops of the CUDA backend's kernels, as `backend="cuda"` runs them, on the host-executed
    kernels (the hybrid op takes its long weight positionally, so that its gradient is checked)."""
    an, hy, la, pn, dce = (importlib.import_module(f"..ops.{name}", __package__)  # the modules, not the functions
                           for name in ("accumulate_norm", "hybrid_accumulate_norm", "linear_act_accumulate",
                                        "probe_norm", "depth_cross_entropy"))

    norm_fwd = autograd_twin(host.accumulate_norm_fwd, host.accumulate_norm_bwd, an.make_backward, an.setup_context)
    hybrid_fwd = autograd_twin(host.hybrid_accumulate_norm_fwd, host.hybrid_accumulate_norm_bwd, hy.make_backward,
                               hy.setup_context)
    probe_fwd = autograd_twin(host.probe_norm_fwd, host.probe_norm_bwd, pn.make_backward, pn.setup_context)
    linear_fwd = autograd_twin(host.linear_act_accumulate_fwd, host.activation_backward, la.make_backward,
                               la.setup_context)
    depth_fwd = autograd_twin(lambda *inputs: dce.chunked_loss(*inputs[:7], dce.LossOptions(*inputs[7:-1]),
                                                               dce.RowKernels(host.cross_entropy_rows,
                                                                              host.cross_entropy_statistics,
                                                                              host.cross_entropy_gradient)),
                              None, lambda _: dce.backward, dce.setup_context)

    def depth_cross_entropy(states, targets, norm_weight, norm_bias, head_weight, *, weights, head_bias,
                            norm="layernorm", label_smoothing=0.0, z_loss=0.0, softcap=None, statistics=False,
                            chunk_rows=DEPTH_CHUNK_ROWS):
        return dce.run_forward(depth_fwd, states, targets, norm_weight, norm_bias, head_weight, weights, head_bias,
                               -100, label_smoothing, z_loss, softcap, norm, 1e-5, chunk_rows, "cuda",
                               statistics=statistics)
    return {
        "accumulate_norm": lambda x, y, w, b, eps=1e-5, norm="layernorm", normalize="input":
            an.run_forward(norm_fwd, x, y, w, b, eps, norm, normalize),
        "hybrid_accumulate_norm": lambda x, f, y, gate, w, b, long_weight=None, eps=1e-5, norm="layernorm":
            hy.run_forward(hybrid_fwd, x, f, y, gate, w, b, long_weight, eps, norm),
        "probe_norm": lambda xs, w, b, eps=1e-5, norm="layernorm": pn.run_forward(probe_fwd, xs, w, b, eps, norm),
        "linear_act_accumulate": lambda x, w, b, y, activation="gelu":
            la.run_forward(linear_fwd, x, w, b, y, activation),
        "depth_cross_entropy": depth_loss(depth_cross_entropy),
    }


# ----------------------------------------------------------------------------- the cases

WIDTHS = (1, 17, 64, 129, 4096, 4097)  # odd widths take the scalar path; 64 and 4096 take packs when aligned


def all_cases() -> list[Case]:
    """Every op, dtype, width, alignment and option combination. The probe runs on both targets (its
    float rows use opt-in shared memory, whose limit differs) and, in float32 and bfloat16, at the
    widths where its rows move to global memory on each (the other kernels use 48 KB of static shared
    memory at most: the target changes nothing for them, so they run on sm_90)."""
    cases = []
    for dtype, shift, op in itertools.product(DTYPES, (0, 1), KERNEL_OPS):
        targets = tuple(SHARED_OPT_IN) if op == "probe_norm" else (90,)
        cases += [Case(op, dtype, width, shift, options, target=target)
                  for target, width, options in itertools.product(targets, WIDTHS, op_options(op, dtype))]
    wide = ((80, 8346), (80, 20865), (90, 11623))  # past sm_80's backward rows and forward rows, sm_90's backward
    cases += [Case("probe_norm", dtype, width, shift, options, target=target)
              for (target, width), dtype, shift in itertools.product(wide, (torch.float32, torch.bfloat16), (0, 1))
              for options in op_options("probe_norm", dtype)]
    return cases


def random_cases(count: int, seed: int, ops=KERNEL_OPS) -> list[Case]:
    """`count` random cases of each op (draw_case), from Python's generator seeded with `seed`."""
    rng = random.Random(seed)
    return [draw_case(op, rng.randint, rng.choice) for op in ops for _ in range(count)]


@dataclass
class Result:
    case: Case
    problems: list
    launches: list


def run_case(kernels: HostKernels, ops: dict, case: Case) -> Result:
    from .agreement import compare_op

    kernels.placement = Placement(checked=True, shift=case.shift)
    kernels.sm_count, kernels.target = case.sm_count, case.target
    kernels.launches, kernels.errors = [], []
    reference_fn, args, kwargs = case_inputs(case)
    try:
        problems, _, _ = compare_op(ops[case.op], reference_fn, args, case.dtype, FP32_RTOL, **kwargs)
    except Exception as error:  # noqa: BLE001 - a crash of one case is that case's failure
        problems = [f"raised {type(error).__name__}: {error}"]
    return Result(case, kernels.errors + problems, kernels.launches)


def print_summary(results: list[Result]) -> None:
    """Per kernel: cases, launches, the access widths seen, and the bytes it moved."""
    kernels: dict = {}
    for result in results:
        for launch in result.launches:
            entry = kernels.setdefault(launch.kernel, {"launches": 0, "widths": set(), "read": 0, "written": 0})
            entry["launches"] += 1
            entry["widths"].add(launch.row_access)
            entry["read"] += launch.bytes_read
            entry["written"] += launch.bytes_written
    print(f"{'kernel':<30} {'launches':>8} {'row access widths (bytes)':>26} {'read MiB':>9} {'written MiB':>11}")
    for name, e in sorted(kernels.items()):
        widths = ",".join(str(w) for w in sorted(e["widths"]))
        print(f"{name:<30} {e['launches']:>8} {widths:>26} {e['read'] / 2**20:>9.2f} {e['written'] / 2**20:>11.2f}")


def results(cases: list[Case], csrc: pathlib.Path = CSRC):
    """Runs the cases on the kernels of `csrc`, built for the host, yielding each case's Result as it ends."""
    kernels = HostKernels.load(csrc)
    ops = public_ops(HostOps(kernels))
    return (run_case(kernels, ops, case) for case in cases)


def check(cases: list[Case], csrc: pathlib.Path = CSRC) -> list[Result]:
    """Every case's Result (results)."""
    return list(results(cases, csrc))


def run_check(only: str | None = None, verbose: bool = False, seed: int = 0, fuzz: int | None = None) -> int:
    """Every case (all_cases), or with `fuzz` that many random cases of each op (random_cases, seeded by
    `seed`); the last line is "N cases, M failures" and the exit code follows it."""
    found = toolchain()
    if isinstance(found, str):
        print(f"cuda-host-check cannot run here: {found}", file=sys.stderr)
        return 2
    torch.manual_seed(seed)
    ops = KERNEL_OPS if only is None else (only,)
    cases = random_cases(fuzz, seed, ops) if fuzz else [c for c in all_cases() if c.op in ops]
    return 1 if report(check(cases), verbose) else 0


def report(results: list[Result], verbose: bool = False) -> int:
    """Prints the failed cases (every case with verbose), the summary and "N cases, M failures"; returns M."""
    failures = 0
    for result in results:
        failures += bool(result.problems)
        if result.problems or verbose:
            status = "FAIL" if result.problems else "ok  "
            shown = "; ".join(f"{launch.kernel} grid={launch.grid} block={launch.block} {launch.row_access}B"
                              for launch in result.launches)
            print(f"{status} {result.case}  [{shown}]")
            for problem in result.problems[:8]:
                print(f"     {problem}")
    print_summary(results)
    print(f"{len(results)} cases, {failures} failures")
    return failures
