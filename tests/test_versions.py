"""The tested stacks and the import-time check (acn_kernels/versions.py)."""
import subprocess
import sys

import pytest

from acn_kernels import versions

GPU_MACHINE = {"python": "3.12.3", "torch": "2.11.0+cu130", "triton": "3.6.0", "numpy": "2.3.5"}


def test_the_gpu_machine_stack_is_tested_and_supported():
    assert versions.differences(GPU_MACHINE) == []
    assert versions.unsupported(GPU_MACHINE, interpreted=False) is None
    assert versions.unsupported(GPU_MACHINE, interpreted=True) is None


def test_each_untested_version_is_one_line_naming_the_tested_ones():
    lines = versions.differences({**GPU_MACHINE, "python": "3.13.0", "triton": "3.7.1"})
    assert lines == ["python 3.13.0: tested with 3.11, 3.12", "triton 3.7.1: tested with 3.6, 3.8, 3.9"]


@pytest.mark.parametrize("package, version", (("torch", "2.10.0"), ("triton", "3.5.1")))
def test_older_than_the_range_is_refused_naming_both_versions(package, version):
    why = versions.unsupported({**GPU_MACHINE, package: version}, interpreted=False)
    assert f"{package} >= " in why and version in why and "\n" not in why


def test_triton_3_6_interpreter_with_numpy_2_4_is_refused():
    stack = {**GPU_MACHINE, "numpy": "2.4.6"}
    why = versions.unsupported(stack, interpreted=True)
    assert "numpy < 2.4" in why and "2.4.6" in why and "3.6.0" in why
    assert versions.unsupported(stack, interpreted=False) is None  # compiled kernels do not care
    assert versions.unsupported({**stack, "triton": "3.9.0"}, interpreted=True) is None


def test_the_report_runs_without_the_package_imported():
    result = subprocess.run([sys.executable, versions.__file__], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("versions found: python ")


def test_the_tested_stacks_table_of_docs_testing_md_is_generated_from_versions_py(capsys):
    """One home for the tested stacks: versions.py; docs/testing.md shows `stacks`' output, pyproject.toml
    declares their range."""
    import pathlib
    import re

    from acn_kernels.tools.pages import block_difference

    root = pathlib.Path(__file__).resolve().parents[1]
    assert block_difference(str(root / "docs" / "testing.md"), "stacks", versions.stacks_table()) is None
    declared = re.search(r'"torch>=([\d.]+),<([\d.]+)"', (root / "pyproject.toml").read_text())
    assert declared.group(1) == versions.tested("torch")[0] and declared.group(2) > versions.tested("torch")[-1]
    assert sorted(versions.ROLES) == sorted(versions.TESTED)
