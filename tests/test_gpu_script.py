"""scripts/gpu_check.sh, checked as far as a CPU allows: it parses, its dry run names every phase
without running or writing anything, and it makes no venv and downloads nothing (the lent machine has
no registry)."""
import pathlib
import re
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def dry_run(*args, tmp_path):
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})


def phases(result) -> list[str]:
    """The phase names of a dry run (the version lines come first)."""
    return [line.split()[0] for line in result.stdout.splitlines() if not line.startswith("versions")]


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_the_dry_run_names_every_phase_and_writes_nothing(tmp_path):
    result = dry_run(tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert phases(result) == ["build", "info", "gpu-tests", "memcheck", "bench-ops", "bench-loss", "bench-vit-acn",
                              "bench-vit-residual"]
    assert "--no-build-isolation --no-deps -e ." in result.stdout and "pytest -m gpu -x" in result.stdout
    assert "compute-sanitizer --tool memcheck" in result.stdout
    limits = [int(s) for s in re.findall(r"at most +(\d+)s", result.stdout)]
    assert sum(limits) <= 8 * 60  # leaves a second try inside the 15-minute lease
    assert not (tmp_path / "out").exists()


def test_the_quick_run_is_a_shorter_second_try(tmp_path):
    assert phases(dry_run("--quick", tmp_path=tmp_path)) == ["build", "info", "gpu-tests", "memcheck", "bench-vit-acn"]


def test_the_fuzz_run_builds_then_fuzzes_the_triton_kernels_at_a_fixed_seed(tmp_path):
    result = dry_run("--fuzz", "1000", tmp_path=tmp_path)
    assert phases(result) == ["build", "fuzz"]
    assert "ACN_KERNELS_FUZZ_EXAMPLES=1000" in result.stdout and "--hypothesis-seed=0" in result.stdout
    assert sum(int(s) for s in re.findall(r"at most +(\d+)s", result.stdout)) <= 9 * 60


def test_no_venv_and_no_downloads():
    text = SCRIPT.read_text()
    assert "venv" not in text.replace("no venv", "")
    assert not re.search(r"pip install (?!--no-build-isolation --no-deps -e \.)", text)


@pytest.mark.parametrize("args", (("--bogus",), ("--fuzz",), ("--fuzz", "many")))
def test_a_bad_option_is_one_line(args, tmp_path):
    result = dry_run(*args, tmp_path=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and args[-1] in result.stderr


def test_every_run_prints_the_versions_found_beside_the_tested_ones(tmp_path):
    result = dry_run(tmp_path=tmp_path)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("versions found: python ")
    assert any("tested with" in line or "every one found is tested" in line for line in lines[1:4])
    assert 'acn_kernels/versions.py 2>&1 | tee -a "$LOG"' in SCRIPT.read_text()  # the real run logs them too
