"""`python -m acn_kernels train`: a small byte-level ACN trained in one process, its held-out losses at every
depth printed, a run resumed from its step-3 checkpoint ending bit for bit where the uninterrupted run ends,
model.pt and config.json loading into one process's GPT, bad input on one line. Across processes (FSDP2):
tests/test_distributed.py."""
import json
import shutil

import pytest
import torch

from acn_kernels import GPT
from acn_kernels.cli import main

SMALL = ["--depth", "2", "--dim", "32", "--heads", "2", "--context", "32", "--batch", "4", "--steps", "6",
         "--eval-every", "3", "--checkpoint-every", "3", "--backend", "reference"]  # the fused ops: test_models


@pytest.mark.parametrize("row, more", [("acn", []), ("hybrid", ["--exit-loss"])])
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path, capsys, row, more):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["train", "--out", str(whole), "--row", row, *SMALL, *more]) == 0
    printed = capsys.readouterr()
    assert "step 3: held-out loss at depth 0..2: " in printed.out + printed.err
    resumed.mkdir()
    shutil.copytree(whole / "step-3", resumed / "step-3")  # as if the run had stopped after step 3
    (resumed / "latest").write_text("step-3\n")
    assert main(["train", "--out", str(resumed), "--row", row, *SMALL, *more, "--resume"]) == 0
    first, second = torch.load(whole / "model.pt"), torch.load(resumed / "model.pt")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    model = GPT(**json.loads((whole / "config.json").read_text()))
    model.load_state_dict(first)
    assert model.connectivity == ("hybrid" if row == "hybrid" else "acn")


@pytest.mark.parametrize("argv, message", [
    (["--resume"], r"--resume needs a checkpoint in --out: no .*latest"),
    (["--text", "TEXT"], r"--text must hold at least 660 bytes for --context 32 \(5% held out\), got 11"),
    (["--steps", "2"], r"--steps must be at least 3 \(the one-cycle schedule warms up over 2\), got 2"),
    (["--tp", "2"], r"--tp must divide the number of processes \(1\), got 2"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    import re
    (tmp_path / "small.txt").write_text("a few bytes")
    argv = [str(tmp_path / "small.txt") if a == "TEXT" else a for a in argv]
    assert main(["train", "--out", str(tmp_path / "out"), *SMALL, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
