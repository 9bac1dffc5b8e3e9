"""The main job and the info command, as a user runs them (small settings)."""
import pytest

from acn_kernels.cli import main
from acn_kernels.demo import effective_depth


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
