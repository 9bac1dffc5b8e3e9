"""The op suite under pytest-benchmark: `pytest bench/ --benchmark-only`.

Each op at one size, forward and backward, for every implementation this machine can time:
eager PyTorch and torch.compile everywhere, the Triton kernels on a GPU."""
import pytest
import torch

from acn_kernels.tools.benchmark import op_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ("eager", "compile", "triton") if DEVICE.type == "cuda" else ("eager", "compile")
CASES = op_cases(DEVICE, quick=DEVICE.type == "cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.name} {str(c.dtype)[6:]}" for c in CASES])
def test_forward_backward(benchmark, case, impl):
    fn, inputs = case.make(impl)
    outputs = fn()
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o.requires_grad]
    grads = [torch.randn_like(o) for o in outputs]

    def step():
        outs = fn()
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.requires_grad]
        torch.autograd.grad(outs, inputs, grads, allow_unused=True)
        sync()
    benchmark(step)
