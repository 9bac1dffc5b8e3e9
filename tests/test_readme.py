"""The README's snippets, run as written: "Your own model" in order, in one namespace (they need the
[timm] and [hf] extras, which CI installs beside the CUDA build of torch that torchvision needs);
"Models", "The fused ops" and "Spend compute only on the depth the ACN uses" as a user runs them."""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def snippets(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def test_your_own_model_snippets_run_as_written(capsys):
    pytest.importorskip("timm", reason="needs the [timm] extra: pip install 'acn-kernels[timm]'")
    pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'acn-kernels[hf]'")
    code = snippets("Your own model")
    assert len(code) == 6
    namespace: dict = {}
    for snippet in code:
        exec(compile(snippet, str(README), "exec"), namespace)
    assert namespace["per_depth"].shape == (5, 2, 2)  # the BERT snippet's
    assert namespace["losses"].shape == (5,) and namespace["tokens"].shape == (2, 12)
    assert namespace["drafted"].shape == (2, 12) and namespace["stats"].new_tokens == 8
    again, lm, ids = namespace["again"], namespace["lm"], namespace["ids"]
    assert type(again).__name__ == "LlamaForCausalLM" and again.config.model_type.startswith("acn_llama (import acn_kernels")
    assert any(hasattr(m, "long_connections") for m in again.modules())
    torch.testing.assert_close(again.eval()(ids).logits, lm.eval()(ids).logits)
    assert "depth" in capsys.readouterr().out and namespace["small"].depth == namespace["report"].depth


def run_as_a_user(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it: backend auto
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("section, checks", [
    ("Models", "assert per_depth.shape == (13, 2, 10) and small.depth == 6 and tokens.shape == (1, 24)\n"
               "assert torch.equal(same, tokens) and torch.equal(lm.generate(prompt, max_new_tokens=16), tokens)\n"
               "assert stats.new_tokens == 16 and len(h_acn.gates) == 4"),
    ("The fused ops", "assert outs.shape == (3, 8, 64) and out.shape == (8, 64) and h.shape == (8, 64)"),
])
def test_overview_snippets_run_as_written(section, checks):
    code = "\n".join(snippets(section))
    result = run_as_a_user(code + checks)
    assert result.returncode == 0, result.stderr[-3000:]


def subsection(section: str, title: str) -> str:
    """The python snippet of a `### title` subsection of a section."""
    text = README.read_text()
    start = text.index(f"### {title}\n", text.index(f"## {section}\n"))
    return re.search(r"```python\n(.*?)```", text[start:], flags=re.S).group(1)


def test_the_fast_training_snippet_is_the_recipe_and_drops_blocks_from_the_start():
    """The README's recipe as table 6c trains it: the annealed hybrid with layer dropout from its first
    step (blocks dropped while it trains, the same coins on every run) and the recommended exit loss."""
    count = """
from acn_kernels.long_connections import LongConnections
dropped = []
kept_units = LongConnections.kept_units
LongConnections.kept_units = lambda self: (lambda kept: dropped.append(self.units - len(kept)) or kept)(kept_units(self))
"""
    snippet = subsection("Models", "Training an ACN language model fast")
    assert 'weights="uniform", curriculum="rotational"' in snippet  # training.RECOMMENDED
    checks = """
from acn_kernels.training import RECOMMENDED
assert RECOMMENDED == dict(weights="uniform", curriculum="rotational")
assert len(dropped) == 20 and sum(dropped) > 0, dropped
assert fast.connectivity == "acn" and dropout.steps == 20
"""
    result = run_as_a_user("import torch\nfrom acn_kernels import GPT\n" + count + snippet + checks)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_depth_on_demand_snippet_runs_as_written():
    code = snippets("Spend compute only on the depth the ACN uses")
    assert len(code) == 1
    checks = """
assert shrink.shrinks and shrink.depth == shrink.shrinks[-1].depth < model.depth, shrink.history
assert depth_used.max() <= shrink.depth
"""
    result = run_as_a_user(code[0] + checks)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "active depth" in result.stdout and "'threshold': 2.0" in result.stdout


def test_the_readme_stays_a_users_guide_under_350_lines_with_its_links_alive():
    text = README.read_text()
    assert len(text.splitlines()) < 350  # long tables and derivations go to docs/
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (README.parent / link).exists(), link
    assert "__" not in re.sub(r"`[^`]*`", "", text)  # no placeholder left unfilled


def test_ci_runs_the_readmes_test_command_word_for_word():
    text = README.read_text()
    commands = re.findall(r"\n    (python3 -m venv .venv && .*)\n", text)
    tests = [command for command in commands if "pytest" in command]
    assert len(tests) == 1 and tests[0] in (README.parent / ".ci" / "run").read_text(), commands
