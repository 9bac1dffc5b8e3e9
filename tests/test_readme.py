"""The README's "Your own model" snippets, run as written, in order, in one namespace (they need the
[timm] and [hf] extras, which CI installs beside the CUDA build of torch that torchvision needs)."""
import pathlib
import re

import pytest

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
    assert len(code) == 5
    namespace: dict = {}
    for snippet in code:
        exec(compile(snippet, str(README), "exec"), namespace)
    assert namespace["per_depth"].shape == (5, 2, 2)  # the BERT snippet's, the last probe
    assert "depth" in capsys.readouterr().out and namespace["small"].depth == namespace["report"].depth
