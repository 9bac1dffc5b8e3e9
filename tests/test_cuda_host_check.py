"""The CUDA kernels of csrc/ executed on the CPU (`python -m acn_kernels cuda-host-check`): every op,
forward and backward, against the reference; the execution layer's own semantics; and breakages
made on purpose in a copy of csrc/, which the check must report."""
import ctypes
import pathlib
import shutil

import pytest
import torch

from acn_kernels.tools.cases import KERNEL_OPS, Case
from acn_kernels.tools.cuda_host_check import (CSRC, SHARED_OPT_IN, HostKernels, all_cases, check, report, results,
                                              toolchain)
from acn_kernels.tools.pages import block_difference

FOUND = toolchain()
pytestmark = pytest.mark.skipif(isinstance(FOUND, str), reason=f"cuda-host-check cannot run here: {FOUND}")
HERE = pathlib.Path(__file__).parent


@pytest.mark.slow
def test_every_cuda_kernel_matches_the_reference_and_the_summary_is_docs_cuda_mds(capsys):
    """Every fixed case run once, as `cuda-host-check --check docs/cuda.md` runs them (its seed): every
    op's kernels against the reference, then every kernel's launches, access widths and bytes and the
    case count as the page shows them. One test: pytest-xdist's loadgroup split the two tests' group
    over both workers, and each ran the 90 s of cases."""
    torch.manual_seed(0)
    every_case = tuple(check(all_cases()))
    for op in KERNEL_OPS:
        results = [result for result in every_case if result.case.op == op]
        failed = [f"{result.case}: {result.problems[:2]}" for result in results if result.problems]
        assert results and not failed, (op, failed[:8])
    assert report(every_case) == 0
    assert block_difference(str(HERE.parent / "docs" / "cuda.md"), "cuda-host-check", capsys.readouterr().out) is None


def test_both_builds_compile_every_kernel_source():
    """setup.py and CMakeLists.txt name their sources: a new .cu left out of either links without its
    kernels and fails to import (undefined symbol), which only CI's CUDA build would show."""
    sources = {f"csrc/{path.name}" for path in CSRC.glob("*.cu")}
    for build in ("setup.py", "CMakeLists.txt"):
        text = (CSRC.parent / build).read_text()
        assert all(source in text for source in sources), (build, [s for s in sources if s not in text])


def test_cases_cover_both_pack_widths_and_the_persistent_loop():
    results = check([c for c in all_cases() if c.op == "accumulate_norm" and c.width == 64])
    widths = {(r.case.dtype, r.case.shift, launch.row_access) for r in results for launch in r.launches}
    assert (torch.bfloat16, 0, 16) in widths and (torch.bfloat16, 1, 2) in widths  # packs aligned, scalar not
    backward = [launch for r in results for launch in r.launches if launch.kernel == "boundary_bwd_kernel"]
    assert all(launch.grid < 5 for launch in backward)  # 5 rows walked by fewer programs


def broken_copy(tmp_path, file: str, old: str, new: str) -> pathlib.Path:
    csrc = tmp_path / "csrc"
    shutil.copytree(CSRC, csrc)
    source = (csrc / file).read_text()
    assert old in source, f"{file} no longer contains {old!r}: update the test"
    (csrc / file).write_text(source.replace(old, new))
    return csrc


BREAKAGES = {  # what is broken: (file, text, its replacement, the ops whose cases must report it)
    "a block reduction skips its last shuffle": ("device_utils.cuh", "offset > 0; offset >>= 1) v = combine",
                                                 "offset > 1; offset >>= 1) v = combine", ("accumulate_norm",)),
    "a pack stores one element fewer": ("device_utils.cuh", "for (int j = 0; j < N; ++j) pack.v[j] = from_float",
                                        "for (int j = 0; j < N - 1; ++j) pack.v[j] = from_float",
                                        ("accumulate_norm",)),
    "the shuffle mask leaves out half of warp 0": (
        "device_utils.cuh", "s = combine(s, __shfl_xor_sync(0xffffffffu, s, offset))",
        "s = combine(s, __shfl_xor_sync(0x0000ffffu, s, offset))", ("accumulate_norm",)),
    "the hybrid backward leaves the gate out of dx": ("boundary_norm.cuh", "t[j] = gate * g[j];", "t[j] = g[j];",
                                                      ("hybrid_accumulate_norm",)),
    "the hybrid forward adds x to the sum without its long weight": (
        "boundary_norm.cuh", "s[j] += long_weight * v[j];", "s[j] += v[j];", ("hybrid_accumulate_norm",)),
    "the hybrid's dgate is one thread's terms, not its block's": (
        "boundary_norm.cuh", "dgate = block_sum(dgate);", "", ("hybrid_accumulate_norm",)),
    "the probe backward rebuilds y_L uncompensated": (
        "probe_norm.cu", "for (int k = 0; k < depth; ++k) add_compensated(hi[i], lo[i], to_float(xs[k * layer + row",
        "for (int k = 0; k < depth; ++k) hi[i] += (to_float(xs[k * layer + row", ("probe_norm",)),
    "the cross-entropy merges the threads' exp-sums without rescaling them to the row's max": (
        "depth_cross_entropy.cu", "block_sum(s.exp_sum * expf(s.max - row_max))", "block_sum(s.exp_sum)",
        ("depth_cross_entropy",)),
    "the statistics merge the threads' entropy sums without shifting them to the row's max": (
        "depth_cross_entropy.cu", "rescale * (s.entropy + (s.max - row_max) * s.exp_sum)", "rescale * s.entropy",
        ("depth_cross_entropy",)),
    "the cross-entropy gradient leaves out the target's -1": (
        "row_math.h", "(is_target ? 1.0f - label_smoothing : 0.0f)", "0.0f", ("depth_cross_entropy",)),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_kernel_is_reported(breakage, tmp_path):
    """Each breakage's cases run until one reports it (the mask's with the layer's own message)."""
    file, old, new, ops = BREAKAGES[breakage]
    cases = [c for c in all_cases() if c.width in (64, 129) and c.dtype != torch.float16 and c.op in ops
             and (c.op != "probe_norm" or dict(c.options)["terms"] == "cancel")]
    wanted = "leaves it out" if "mask" in breakage else ""
    reported = next((result for result in results(cases, broken_copy(tmp_path, file, old, new))
                     if any(wanted in problem for problem in result.problems)), None)
    assert reported is not None, f"{breakage}: none of {len(cases)} cases reported it"


PLANS = {  # launch_plan.h planted wrong: (its text, the replacement, the cases that must report it)
    "the probe's scratch a float row short": (
        "return 4 * floats <= shared_opt_in_bytes ? 0 : floats;", "return 4 * floats <= shared_opt_in_bytes ? 0 : floats - dim;",
        lambda c: c.op == "probe_norm" and c.width > 8000),
    "the partial rows without dbias's half": (
        "const int64_t width = (has_bias ? 2 : 1) * dim + scalars;", "const int64_t width = dim + scalars;",
        lambda c: c.op == "accumulate_norm" and dict(c.options)["bias"] and c.width == 64),
    "the hybrid's sums without dlong_weight": (
        "return (has_bias ? 2 : 1) * dim + scalars; }", "return (has_bias ? 2 : 1) * dim + scalars - 1; }",
        lambda c: c.op == "hybrid_accumulate_norm" and dict(c.options)["long_weight"] and c.width == 64),
}


@pytest.mark.parametrize("plan", PLANS)
def test_a_wrong_launch_plan_is_reported(plan, tmp_path):
    """The host check runs csrc/launch_plan.h, the extension's own plan (program counts, partial rows,
    scratch): a wrong one there fails it, as it would fail the extension on a GPU."""
    old, new, chosen = PLANS[plan]
    cases = [c for c in all_cases() if chosen(c) and c.dtype != torch.float16]
    assert cases
    reported = next((result for result in results(cases, broken_copy(tmp_path, "launch_plan.h", old, new))
                     if result.problems), None)
    assert reported is not None, f"{plan}: none of {len(cases)} cases reported it"


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    csrc = tmp_path_factory.mktemp("layer") / "csrc"
    shutil.copytree(CSRC, csrc)
    shutil.copy(HERE / "simt_layer_kernels.cu", csrc)
    return HostKernels.load(csrc)


def launch(layer, kernel: int, threads: int, size: int, target: int = 90) -> tuple[torch.Tensor, list]:
    layer.launches, layer.errors, layer.target = [], [], target
    with layer.call():
        out = layer.output("out", (size,), torch.float32)
        layer.library.acn_test_launch(kernel, ctypes.c_void_p(out.data_ptr()), threads)
    return out, layer.errors


def test_shuffles_read_the_lanes_cuda_defines(layer):
    out, errors = launch(layer, 0, 64, 3 * 64)
    assert errors == []
    t = torch.arange(64)
    xor, down, indexed = out.view(3, 64)
    assert torch.equal(xor, (t ^ 5).float())
    assert torch.equal(down, torch.where(t % 32 + 3 < 32, t + 3, t).float())  # past the warp: its own value
    assert torch.equal(indexed, (t - t % 16 + 7).float())  # width 16: lane 7 of each 16-lane segment


@pytest.mark.parametrize("kernel, threads, message", [
    (0, 48, "whose lanes are 0x0000ffff"),                    # a full mask in a warp of 16 threads
    (1, 64, "__syncthreads() in block 0 was reached by 16 threads after 48"),
    (2, 32, "with mask 0x00000001, which leaves it out"),
    (3, 32, "stores 4 bytes at byte 128 of out, outside its 128 bytes"),
    (4, 0, "block of 2048 threads, CUDA allows 1 to 1024"),
])
def test_what_cuda_leaves_undefined_is_reported(layer, kernel, threads, message):
    _, errors = launch(layer, kernel, threads, 3 * 64 if kernel in (0, 4) else threads)
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize("kernel, target, message", [
    (5, 90, "65536 bytes of dynamic shared memory, more than the 49152 the kernel may use"),
    (6, 80, "204800 bytes of dynamic shared memory, more than the 166912 a block may opt in to"),
    (6, 90, None),
])
def test_shared_memory_beyond_the_targets_limits_is_reported(layer, kernel, target, message):
    out, errors = launch(layer, kernel, 32, 32, target)
    if message is None:
        assert errors == [] and torch.equal(out, torch.ones(32))
    else:
        assert any(message in e for e in errors), errors


@pytest.mark.parametrize("dtype, width, target", [
    (torch.bfloat16, 12288, 90), (torch.float32, 16384, 90), (torch.float32, 9000, 80), (torch.bfloat16, 4096, 80),
    (torch.float32, 32768, 90), (torch.bfloat16, 20865, 80),
])
def test_probe_norm_rows_leave_shared_memory_where_the_target_has_too_little(dtype, width, target):
    """The widths of issue 20 (NaN gradients once past 48 KB): the float rows go to global scratch
    past the target's opt-in limit (the backward's five per element, the forward's two), and stay in
    shared memory below it."""
    case = Case("probe_norm", dtype, width, 0, (("norm", "layernorm"), ("bias", True), ("terms", "cancel")),
                rows=3, sm_count=1, target=target)
    [result] = check([case])
    assert result.problems == []
    in_shared = {launch.kernel: launch.shared > 0 for launch in result.launches}
    def fits(floats_per_element):
        return floats_per_element * 4 * width <= SHARED_OPT_IN[target]

    assert in_shared == {"probe_norm_fwd_kernel": fits(2), "probe_norm_bwd_kernel": fits(5)}
