"""The command line as a user runs it: the demo (small settings), info and compile-report, and the
compile report's reading of PTX and occupancy."""
import os
import re
import subprocess
import sys

import pytest
import torch

from acn_kernels.backend import resolve_backend
from acn_kernels.cli import main
from acn_kernels.tools.compile_report import (Build, access_widths, linear_builds, matrix_instructions, narrow_access,
                                              resident_warps, wgmma_expected)
from acn_kernels.depth import smallest_depth_within


def test_effective_depth_is_the_first_depth_within_one_point_of_best():
    assert smallest_depth_within([10.0, 95.5, 96.0, 97.0, 96.9], 1.0) == 2
    assert smallest_depth_within([50.0, 60.0, 70.0], 1.0) == 2
    assert smallest_depth_within([99.0, 10.0, 99.5], 1.0) == 0
    assert smallest_depth_within([90.0, 94.0, 97.0], 2.9) == 2 and smallest_depth_within([90.0, 94.0, 97.0], 3.0) == 1


@pytest.mark.slow
@pytest.mark.parametrize("model", ("mlp", "mixer"))
def test_demo_prints_a_table_and_writes_a_plot(model, tmp_path, capsys):
    """The MLP on the fused kernels (the interpreter); the Mixer as a CPU user runs it, on the reference
    (its GEMMs take minutes in the interpreter; its fused step is tested in test_integration)."""
    plot = tmp_path / "plot.png"
    backend = "auto" if model == "mlp" else "reference"
    assert main(["demo", "--model", model, "--depth", "2", "--epochs", "1", "--plot", str(plot),
                 "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert f"backend {resolve_backend(backend, torch.device('cpu'))}" in out
    assert "depth k" in out and "effective depth" in out and "acn compressed to its effective depth" in out
    for connectivity in ("acn", "residual", "ffn"):
        assert f"{connectivity}: best" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_is_repeatable(tmp_path, capsys):
    tables = []
    for _ in range(2):
        main(["demo", "--depth", "2", "--epochs", "1", "--plot", str(tmp_path / "p.png")])
        # every line but the measured latency of the compressed model, a timing
        tables.append([line for line in capsys.readouterr().out.splitlines() if "latency" not in line])
    assert tables[0] == tables[1]


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for row in ("torch", "triton", "triton interpreter", "CUDA extension", "GPU"):
        assert row in out
    assert re.search(r"^linear +cublas", out, re.M) and re.search(r"^probe_norm +triton", out, re.M)


def run_module(*args, interpret: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "acn_kernels", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_compile_report_compiles_a_kernel_for_sm80_and_sm90_without_a_gpu(tmp_path):
    page = tmp_path / "report.md"
    page.write_text("# The compile report\n\nHand-written prose.\n")
    result = run_module("compile-report", "--only", "accumulate_norm_fwd_wide_kernel", "--markdown", str(page),
                        interpret=False)
    assert result.returncode == 0, result.stdout + result.stderr
    text = page.read_text()
    assert text.startswith("# The compile report\n\nHand-written prose.\n") and result.stdout.strip() in text
    checked = run_module("compile-report", "--only", "accumulate_norm_fwd_wide_kernel", "--check", str(page),
                         interpret=False)
    assert checked.returncode == 0, checked.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("accumulate_norm_fwd_wide_kernel")]
    assert len(lines) == 24  # accumulate_norm's and the hybrid's, three dtypes, two targets, aligned and unaligned
    rows = [line for line in lines if "HYBRID=True" not in line]
    assert len(rows) == 12 and {row.split()[3] for row in rows} == {"sm_80", "sm_90"}
    widths = {(row.split()[4], row.split()[5]): row.split()[9] for row in rows}  # (dtype, alignment): ld B
    assert widths[("bf16", "aligned")] == "16" and widths[("bf16", "unaligned")] == "2-4"  # 4: the fp32 sum
    assert "24 compilations, 0 failed, spilled, narrower than 16 bytes when aligned or without wgmma" in result.stdout
    one_target = run_module("compile-report", "--only", "accumulate_norm_fwd_wide_kernel", "--target", "90",
                            interpret=False)
    assert "12 compilations, 0 failed" in one_target.stdout and " sm_80 " not in one_target.stdout


def test_compile_report_refuses_to_run_under_the_interpreter():
    result = run_module("compile-report", interpret=True)
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr
    assert run_module("compile-report", "--only", "no_such_kernel", interpret=False).returncode == 2


PTX = """
    ld.param.u64 %rd1, [k_param_0];
    ld.param.u64 %rd2, [k_param_1];
    ld.param.u32 %r1, [k_param_2];
    mul.wide.s32 %rd3, %r1, 2;
    add.s64 %rd4, %rd1, %rd3;
    @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
    ld.global.b32 %r6, [ %rd2 + 0 ];
    mov.u64 %rd5, %rd4;
    @%p2 st.global.b16 [ %rd5 + 16 ], { %rs1 };
    cp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
"""


def test_row_access_widths_are_traced_to_their_pointer():
    # param 0 is x_ptr (row data), param 1 w_ptr (a norm weight: not row data), param 2 an int
    widths = access_widths(PTX, {0: "x_ptr", 1: "w_ptr"})
    assert widths == {"load": [16, 16], "store": [2]}


def test_resident_warps_follow_the_occupancy_calculator():
    assert resident_warps(90, registers=32, shared=0, num_warps=4) == 64
    assert resident_warps(90, registers=64, shared=0, num_warps=4) == 32
    assert resident_warps(90, registers=128, shared=0, num_warps=4) == 16
    assert resident_warps(80, registers=40, shared=100 * 1024, num_warps=4) == 4   # 1 block: shared memory
    assert resident_warps(90, registers=40, shared=100 * 1024, num_warps=4) == 8   # 2 blocks on sm_90
    assert resident_warps(90, registers=16, shared=0, num_warps=1) == 32           # 32 blocks at most


def test_only_aligned_row_kernels_with_room_for_16_bytes_must_use_them():
    row = {"alignment": "aligned", "kernel": "accumulate_norm_fwd_kernel", "tile_bytes": 64, "loads": [8, 16],
           "stores": [16]}
    assert narrow_access(row)
    assert not narrow_access({**row, "alignment": "unaligned"})
    assert not narrow_access({**row, "tile_bytes": 8})
    assert not narrow_access({**row, "kernel": "gemm_kernel"})
    assert not narrow_access({**row, "loads": [16]})


def test_compile_report_covers_every_gemm_tile_the_launcher_can_pick():
    from itertools import product

    from acn_kernels.ops._gemm import TILE_KEYS, gemm_tiles
    built = {(b.dtype, b.constexprs["EPILOGUE"], b.constexprs["ACTIVATION"] == "swiglu",
              tuple(b.constexprs[k] for k in TILE_KEYS[:3]) + (b.num_warps, b.num_stages))
             for b in linear_builds() if b.kernel == "gemm_kernel"}
    sizes = (1, 15, 16, 17, 33, 63, 64, 65, 129, 1000, 4096)
    for dtype, sms, (m, n, k) in product((torch.float32, torch.float16, torch.bfloat16), (None, 8, 132),
                                         product(sizes, repeat=3)):
        for gated, epilogues in ((False, ("forward", "times_activation_grad", "weight_grad")),
                                 (True, ("forward", "times_activation_grad"))):
            for epilogue in epilogues:
                tiles = gemm_tiles(m, n, k, dtype, sms, gated, epilogue)
                assert (dtype, epilogue, gated, tuple(tiles[key] for key in TILE_KEYS)) in built, (dtype, m, n, k)


def test_sm90_gemm_tiles_must_run_on_wgmma():
    assert matrix_instructions("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == "wgmma"
    assert matrix_instructions("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma"
    assert matrix_instructions("fma.rn.f32") == "fma"
    gemm = Build("acn_kernels.ops._gemm", "gemm_kernel", torch.bfloat16, {"BLOCK_M": 128, "INPUT_PRECISION": "ieee"})
    assert wgmma_expected(gemm, 90) and not wgmma_expected(gemm, 80)
    assert not wgmma_expected(Build(gemm.module, gemm.kernel, torch.bfloat16, {"BLOCK_M": 32}), 90)
    fp32 = {"BLOCK_M": 128, "INPUT_PRECISION": "ieee"}
    assert not wgmma_expected(Build(gemm.module, gemm.kernel, torch.float32, fp32), 90)  # FMAs: no tensor cores
    assert wgmma_expected(Build(gemm.module, gemm.kernel, torch.float32, {**fp32, "INPUT_PRECISION": "tf32"}), 90)


def test_bench_names_the_fastest_fused_backend_per_op():
    """What a GPU run of bench proposes for backend="auto": per op, the fastest of triton, cublas and
    cuda summed over its cases forward+backward, where two or more of them ran."""
    from acn_kernels.tools.benchmark import Case, Result, measured_auto_table

    def result(name, impl, ms, pass_="forward+backward"):
        return Result(Case("ops", name, torch.float32, None), pass_, impl, ms, None)
    results = [result("accumulate_norm 4096x1024", "triton", 2.0), result("accumulate_norm 4096x1024", "cuda", 1.0),
               result("accumulate_norm 8192x2048", "triton", 4.0), result("accumulate_norm 8192x2048", "cuda", 4.5),
               result("probe_norm 13x4096x768", "triton", 1.0), result("probe_norm 13x4096x768", "cuda", 1.5),
               result("probe_norm 13x4096x768", "cuda", 0.1, pass_="forward"),
               result("linear_act_accumulate 8192x2048x2048", "eager", 0.5),
               result("linear_act_accumulate 8192x2048x2048", "triton", 3.0),
               result("linear_act_accumulate 8192x2048x2048", "cublas", 2.5),
               result("linear_act_accumulate 8192x2048x2048", "cuda", 2.6),
               result("linear 12608x384x1152", "triton", 1.0)]  # one fused backend ran: nothing chosen
    assert measured_auto_table(results) == {"accumulate_norm": "cuda", "probe_norm": "triton",
                                            "linear_act_accumulate": "cublas"}


def test_a_missing_extra_is_named(monkeypatch):
    from acn_kernels._extras import require

    monkeypatch.setitem(sys.modules, "tqdm", None)  # what a plain install without the extra has
    with pytest.raises(ImportError, match=r"bench needs tqdm: pip install 'acn-kernels\[bench\]'"):
        require("tqdm", "bench", "bench")


@pytest.mark.parametrize("command", (["demo"], ["bench", "--quick"], ["paper", "--quick"]))
def test_a_subcommand_without_its_extra_says_so_in_one_line(command, monkeypatch, capsys):
    import importlib.metadata

    version = importlib.metadata.version

    def without_matplotlib(name):
        if name == "matplotlib":
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", without_matplotlib)
    assert main(command) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"python -m acn_kernels {command[0]}: {command[0]} needs matplotlib: "
                                 f"pip install 'acn-kernels[{command[0]}]'\n")


def test_a_module_missing_at_import_is_one_line_too(monkeypatch, capsys):
    """A source-tree run has no installed extras to check up front: the first import names the extra."""
    monkeypatch.setattr("acn_kernels.cli.check_extra", lambda extra, what: None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["bench", "--quick"]) == 2
    expected = "python -m acn_kernels bench: bench needs tqdm: pip install 'acn-kernels[bench]'\n"
    assert capsys.readouterr().err == expected


def test_a_page_keeps_its_prose_and_its_block_follows_the_tool(tmp_path):
    from acn_kernels.tools.pages import block_difference, write_block

    page = tmp_path / "traffic.md"
    page.write_text("# Traffic\n\nHow it is counted.\n")
    write_block(str(page), "traffic", "op  bytes\na   1\n")
    page.write_text(page.read_text() + "\nWhat the numbers say.\n")
    assert block_difference(str(page), "traffic", "op  bytes\na   1\n") is None
    write_block(str(page), "traffic", "op  bytes\na   2\n")
    text = page.read_text()
    assert text.startswith("# Traffic\n\nHow it is counted.\n") and text.endswith("\nWhat the numbers say.\n")
    assert text.count("a   2") == 1 and "a   1" not in text
    assert "+a   3" in block_difference(str(page), "traffic", "op  bytes\na   3\n")
    assert "has no block" in block_difference(str(page), "bench", "x")


@pytest.mark.parametrize("argv, named", [
    (("demo", "--epochs", "0"), "--epochs"), (("demo", "--epochs", "-1"), "--epochs"), (("demo", "--depth", "0"), "--depth"),
    (("demo", "--backend", "triton"), "backend='triton'"), (("demo", "--backend", "cuda"), "backend='cuda'"),
    (("bench", "--cases", "["), "--cases"), (("paper", "--seeds", "0"), "--seeds"),
    (("bench", "--suite", "speculative", "--quick", "--lm-models", "missing"),
     "--lm-models: missing/addition-acn-seed0.pt is missing"),
    (("cuda-host-check", "--fuzz", "0"), "--fuzz"), (("compile-report", "--jobs", "0"), "--jobs"),
    (("traffic", "--check", "missing.md"), "--check: missing.md is not a file"),
    (("cuda-host-check", "--check", "README.md"), "README.md has no block of `cuda-host-check` output"),
])
def test_a_bad_argument_is_one_line_naming_it_with_exit_2(argv, named):
    result = run_module(*argv, interpret=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert named in result.stderr and f"python -m acn_kernels {argv[0]}: " in result.stderr
