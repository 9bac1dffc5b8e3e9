"""The built CUDA extension, on any machine: it registers every op and rejects CPU tensors with a
message naming the op and the argument. Runs where acn_kernels._C is built (CI builds it against
a CUDA torch); elsewhere there is nothing to test and the module says why."""
import pytest
import torch

import acn_kernels
from acn_kernels.backend import CUDA_EXTENSION, CUDA_EXTENSION_ERROR

pytestmark = pytest.mark.skipif(CUDA_EXTENSION is None, reason=f"CUDA extension not built: {CUDA_EXTENSION_ERROR}")

OPS = ("accumulate_norm_fwd", "accumulate_norm_bwd", "hybrid_accumulate_norm_fwd", "hybrid_accumulate_norm_bwd",
       "probe_norm_fwd", "probe_norm_bwd", "linear_act_accumulate_fwd", "activation_backward")


def test_every_op_is_registered_with_the_triton_schema():
    for name in OPS:
        cuda_schema = str(getattr(torch.ops.acn_kernels_cuda, name).default._schema).split("::", 1)[1]
        triton_schema = str(getattr(torch.ops.acn_kernels, name).default._schema).split("::", 1)[1]
        assert cuda_schema == triton_schema, name


def test_compiled_architectures():
    assert set(CUDA_EXTENSION.compiled_archs().split(",")) >= {"80", "90"}


@pytest.mark.parametrize("call", [
    lambda ops, x, w: ops.accumulate_norm_fwd(x, None, w, None, 1e-5, True, False),
    lambda ops, x, w: ops.accumulate_norm_bwd(x, None, x, w, w, w, False, True, None),
    lambda ops, x, w: ops.hybrid_accumulate_norm_fwd(x, x, None, w[0], w, None, None, 1e-5, True),
    lambda ops, x, w: ops.hybrid_accumulate_norm_bwd(x, None, None, x, x, x, w[0], w, None, w, w, False, True),
    lambda ops, x, w: ops.probe_norm_fwd(x.unsqueeze(0), w, None, 1e-5, True),
    lambda ops, x, w: ops.probe_norm_bwd(x.unsqueeze(0), x.unsqueeze(0), w, w, w, False, True),
    lambda ops, x, w: ops.linear_act_accumulate_fwd(x, w.unsqueeze(0), None, None, "gelu"),
    lambda ops, x, w: ops.activation_backward(x, None, x, "gelu", torch.float32),
    lambda ops, x, w: ops.cross_entropy_rows(x, w.long()[:4], w[:4], -100, 0.0, 0.0, 0.0, True),
    lambda ops, x, w: ops.cross_entropy_statistics(x, w.long()[:4], 0.0),
    lambda ops, x, w: ops.cross_entropy_gradient(x, w.long()[:4], w[:4], w[:4], 8, 0.0, 0.0, 0.0),
], ids=OPS + ("cross_entropy_rows", "cross_entropy_statistics", "cross_entropy_gradient"))
# depth_cross_entropy's row kernels: the chunk loop is Python, no Triton op
def test_cpu_tensors_are_rejected_with_a_clear_error(call):
    with pytest.raises(RuntimeError, match=r"acn_kernels_cuda::\w+: \w+ must be a CUDA tensor, got a tensor on cpu"):
        call(torch.ops.acn_kernels_cuda, torch.randn(4, 8), torch.ones(8))


def test_the_cuda_backend_names_the_problem_for_cpu_tensors():
    with pytest.raises(ValueError, match=r"backend='cuda' needs CUDA tensors, got tensors on cpu"):
        acn_kernels.accumulate_norm(torch.randn(4, 8), None, torch.ones(8), backend="cuda")
    with pytest.raises(ValueError, match=r"backend='cuda' needs CUDA tensors, got tensors on cpu"):
        acn_kernels.depth_cross_entropy(torch.randn(2, 4, 8), torch.zeros(4, dtype=torch.long), torch.ones(8), None,
                                        torch.randn(5, 8), backend="cuda")
