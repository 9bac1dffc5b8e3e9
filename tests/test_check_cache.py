"""The checks that keep their results by a hash of their inputs (acn_kernels/tools/cache.py): a kernel
whose source changed recompiles and nothing else, an empty cache gives the same output bit for bit,
and cuda-report reads the extension build's own ptxas report."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import triton
import triton.language as tl

from acn_kernels.tools import cuda_report
from acn_kernels.tools.cache import Store, jit_source_key

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "acn_kernels"
REPORT = """
from acn_kernels.tools import compile_report as r
builds = [next(r.loss_builds()), next(b for b in r.linear_builds() if b.kernel == "activation_backward_kernel")]
r.print_rows(r.compiled_rows([(b, alignment, 90) for b in builds for alignment in r.ALIGNMENTS], 2))
"""


def compile_rows(copy: pathlib.Path, cache: pathlib.Path) -> tuple[str, str]:
    """(the report's rows, its cache line) of a cross-entropy and an activation kernel, compiled from the
    package copy in `copy` with the cache in `cache`."""
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "ACN_KERNELS_CACHE": str(cache),
           "TRITON_CACHE_DIR": str(cache.parent / "triton"), "PYTHONPATH": str(copy)}
    result = subprocess.run([sys.executable, "-c", REPORT], cwd=copy, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, next(line for line in result.stderr.splitlines() if line.startswith("compile-report:"))


def test_a_changed_kernel_recompiles_itself_and_nothing_else(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(PACKAGE, copy / "acn_kernels", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    cache = tmp_path / "cache"
    first, line = compile_rows(copy, cache)
    assert line.startswith("compile-report: 4 compiled, 0 from the cache")
    again, line = compile_rows(copy, cache)
    assert again == first and line.startswith("compile-report: 0 compiled, 4 from the cache")
    loss = copy / "acn_kernels" / "ops" / "depth_cross_entropy.py"
    source = loss.read_text()
    line_of_the_kernel = "    counted = target != ignore_index\n"
    assert source.count(line_of_the_kernel) == 1, "the row kernel's line changed: update the test"
    loss.write_text(source.replace(line_of_the_kernel, line_of_the_kernel.replace("\n", "  # another source\n")))
    edited, line = compile_rows(copy, cache)
    assert edited == first and line.startswith("compile-report: 2 compiled, 2 from the cache")
    shutil.rmtree(cache)  # an empty cache: the same rows again
    assert compile_rows(copy, cache)[0] == first


@triton.jit
def _helper(x):
    return x + 1


@triton.jit
def _other_helper(x):
    return x + 2


@triton.jit
def _kernel(ptr):
    tl.store(ptr, _helper(tl.load(ptr)) * SCALE)


SCALE: tl.constexpr = 2


def test_the_source_key_follows_the_jit_functions_and_constants_a_kernel_reaches(monkeypatch):
    key = jit_source_key(_kernel)
    assert key == jit_source_key(_kernel) and key != jit_source_key(_helper)
    monkeypatch.setitem(globals(), "SCALE", 3)
    assert jit_source_key(_kernel) != key
    monkeypatch.undo()
    assert jit_source_key(_kernel) == key
    monkeypatch.setitem(globals(), "_helper", _other_helper)
    assert jit_source_key(_kernel) != key


def test_a_store_keeps_a_value_by_its_key_and_counts_hits(tmp_path):
    store = Store("kind", tmp_path)
    assert store.get("ab12") is None and store.misses == 1
    store.put("ab12", {"registers": 40, "loads": [16, 4]})
    assert store.get("ab12") == {"registers": 40, "loads": [16, 4]} and store.hits == 1
    assert list((tmp_path / "kind").rglob("*.tmp")) == []


PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers
"""


def test_cuda_report_reads_each_sources_ptxas_report_from_the_build_log():
    log = (f"[1/3] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -I/x/csrc -c -c /x/csrc/a.cu -o a.o "
           f"-gencode=arch=compute_80,code=sm_80\n{PTXAS}[2/3] c++ -c /x/csrc/bindings.cpp -o bindings.o\n"
           "/x/csrc/bindings.cpp:1: warning: unrelated\n"
           f"[3/3] /usr/local/cuda/bin/nvcc -c /x/csrc/b.cu -o b.o\n{PTXAS.splitlines()[1]}\n")
    rows = cuda_report.rows_from_build_log(log)
    assert set(rows) == {"a.cu", "b.cu"}
    assert [(r["target"], r["registers"], r["spills"]) for r in rows["a.cu"]] == [("sm_80", 32, 0), ("sm_90", 255, 8)]
    assert [r["target"] for r in rows["b.cu"]] == ["sm_80"]


def test_cuda_report_from_a_log_without_a_source_fails_by_name(tmp_path, capsys):
    log = tmp_path / "build.log"
    log.write_text("[1/1] nvcc -c /x/csrc/accumulate_norm.cu -o a.o\n" + PTXAS)
    assert cuda_report.run_cuda_report(str(log)) == 1
    out = capsys.readouterr().out
    assert "has no ptxas report of probe_norm.cu" in out and "SPILLS" in out


@pytest.mark.skipif(cuda_report.find_nvcc() is None, reason="needs nvcc (CUDA_HOME)")
def test_cuda_report_compiles_once_then_reads_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACN_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda_report, "CSRC", _csrc_with(tmp_path, "depth_cross_entropy.cu"))
    assert cuda_report.run_cuda_report() == 0
    first = capsys.readouterr().out
    assert "cross_entropy_rows" in first and len(list((tmp_path / "cuda-report").rglob("*.json"))) == 1
    assert cuda_report.run_cuda_report() == 0 and capsys.readouterr().out == first


def _csrc_with(tmp_path: pathlib.Path, source: str) -> pathlib.Path:
    """A csrc/ holding one .cu and every header."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for path in [cuda_report.CSRC / source, *cuda_report.CSRC.glob("*.h"), *cuda_report.CSRC.glob("*.cuh")]:
        shutil.copy(path, csrc)
    return csrc
