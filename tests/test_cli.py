"""The command line as a user runs it: the demo (small settings), info and compile-report."""
import os
import subprocess
import sys

import pytest

from acn_kernels.cli import main
from acn_kernels.experiments.demo import effective_depth


def test_effective_depth_is_the_first_depth_within_one_point_of_best():
    assert effective_depth([10.0, 95.5, 96.0, 97.0, 96.9]) == 2
    assert effective_depth([50.0, 60.0, 70.0]) == 2
    assert effective_depth([99.0, 10.0, 99.5]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ("mlp", "mixer"))
def test_demo_prints_a_table_and_writes_a_plot(model, tmp_path, capsys):
    plot = tmp_path / "plot.png"
    assert main(["demo", "--model", model, "--depth", "2", "--epochs", "1", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "depth k" in out and "effective depth" in out
    for connectivity in ("acn", "residual", "ffn"):
        assert f"{connectivity}: best" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_is_repeatable(tmp_path, capsys):
    tables = []
    for _ in range(2):
        main(["demo", "--depth", "2", "--epochs", "1", "--plot", str(tmp_path / "p.png")])
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1]


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for row in ("torch", "triton", "triton interpreter", "CUDA extension", "GPU"):
        assert row in out


def run_module(*args, interpret: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "acn_kernels", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_compile_report_compiles_a_kernel_for_sm80_and_sm90_without_a_gpu():
    result = run_module("compile-report", "--only", "accumulate_norm_fwd_wide_kernel", interpret=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("accumulate_norm_fwd_wide_kernel")]
    assert len(rows) == 6  # three dtypes, two targets
    assert {row.split()[3] for row in rows} == {"sm_80", "sm_90"}
    assert "6 compilations, 0 failed or spilled" in result.stdout


def test_compile_report_refuses_to_run_under_the_interpreter():
    result = run_module("compile-report", interpret=True)
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr
    assert run_module("compile-report", "--only", "no_such_kernel", interpret=False).returncode == 2
