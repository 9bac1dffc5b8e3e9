"""The tolerance rule itself: what it lets through and what it catches."""
import pytest
import torch

from acn_kernels.tools.agreement import compare_op, mismatch

TERMS = 5 * 4096


def scalar(value: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype)


def test_a_gate_gradient_within_its_sums_rounding_walk_passes_a_lucky_eager_draw():
    # CI's bfloat16 case: kernel error 0.278, eager's single draw 0.0891, the sum cancelled to 5.87
    exact = scalar(5.87)
    assert mismatch(exact + 0.278, exact, exact + 0.0891, torch.bfloat16, 1e-5, "gate") is not None
    assert mismatch(exact + 0.278, exact, exact + 0.0891, torch.bfloat16, 1e-5, "gate", TERMS ** 0.5) is None


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_a_gate_gradient_missing_a_block_of_terms_fails(dtype):
    lost = 512 ** 0.5  # a block of 512 unit products: its typical sum
    exact = scalar(5.87)
    assert mismatch(exact + lost, exact, exact + 0.0891, dtype, 1e-5, "gate", TERMS ** 0.5) is not None


def test_compare_op_widens_only_16_bit_scalar_gradients():
    torch.manual_seed(3)
    x = torch.randn(64, 33, dtype=torch.bfloat16)
    gate = torch.randn(())

    offset = 2 ** -8 * x.numel() ** 0.5  # within 2 eps of sqrt(N) (bfloat16), far beyond float32's rtol

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(x, gate):
            return x * gate

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, dout):
            x, gate = ctx.saved_tensors
            return dout * gate, (dout.float() * x.float()).sum() + offset

    fused = Fused.apply

    def reference(x, gate):
        return x * gate

    problems, _, _ = compare_op(fused, reference, (x, gate), torch.bfloat16, 1e-5)
    assert problems == []
    problems, _, _ = compare_op(fused, reference, (x.float(), gate), torch.float32, 1e-5)
    assert any(p.startswith("gradient 1") for p in problems), problems
