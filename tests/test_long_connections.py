"""LongConnections against a plain Python loop over the same modules: forward, probe, every gradient,
each backend (Triton under the interpreter), torch.compile; its norms, truncate and errors."""
import pytest
import torch
from torch import nn

from acn_kernels import LongConnections
from op_harness import DEVICE, FUSED_BACKENDS

DIM = 24
BACKENDS = [pytest.param("reference", id="reference"), *FUSED_BACKENDS]


class DuckLayerNorm(nn.Module):
    """A LayerNorm that is not nn.LayerNorm: weight, bias and eps, as other libraries write them."""

    def __init__(self, dim):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim)), 1e-6

    def forward(self, x):
        return nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def make_norm(kind: str) -> nn.Module:
    norm = {"layernorm": lambda: nn.LayerNorm(DIM), "rmsnorm": lambda: nn.RMSNorm(DIM, eps=1e-6),
            "duck": lambda: DuckLayerNorm(DIM)}[kind]()
    with torch.no_grad():  # not the identity, so that wrong parameters show
        for p in norm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return norm


def make_parts(depth: int, norm: str, with_input_norms: bool):
    """(blocks, input norms or None) on the test device."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM)).to(DEVICE)
              for _ in range(depth)]
    input_norms = [make_norm(norm).to(DEVICE) for _ in range(depth)] if with_input_norms else None
    return blocks, input_norms


def plain_loop(x0, blocks, input_norms, final_norm):
    """The definition, written out: every partial sum through the final norm."""
    x, total, sums = x0, x0, [x0]
    for i, block in enumerate(blocks):
        x = block(input_norms[i](x) if input_norms else x)
        total = total + x
        sums.append(total)
    normed = [final_norm(s) if final_norm is not None else s for s in sums]
    return normed[-1], torch.stack(normed)


def grads(outputs, params):
    return torch.autograd.grad(outputs, params, [torch.ones_like(o) for o in outputs])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ("layernorm", "rmsnorm", "duck"))
@pytest.mark.parametrize("with_input_norms", (True, False), ids=("input_norms", "no_input_norms"))
def test_matches_a_plain_loop_forward_probe_and_every_gradient(backend, norm, with_input_norms):
    blocks, input_norms = make_parts(3, norm, with_input_norms)
    final_norm = make_norm(norm).to(DEVICE)
    long = LongConnections(blocks, input_norms, final_norm, backend=backend)
    x0 = torch.randn(2, 3, 5, DIM, device=DEVICE, requires_grad=True)  # any leading shape
    params = [x0, *long.parameters()]
    out, probed = long(x0), long.probe(x0)
    expected_out, expected_probe = plain_loop(x0, long.blocks, input_norms, final_norm)
    assert probed.shape == (4, *x0.shape)
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probed, expected_probe, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads([out, probed], params), grads([expected_out, expected_probe], params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def hybrid_loop(x0, blocks, input_norms, final_norm, gates, long_weights):
    """The hybrid of the definition, written out: s_0 = x_0, x_i = block_i(norm_i(s_{i-1})),
    s_i = g_i s_{i-1} + x_i, every partial sum x_0 + b_1 x_1 + ... through the final norm."""
    s, total, sums = x0, x0, [x0]
    for i, block in enumerate(blocks):
        x = block(input_norms[i](s) if input_norms else s)
        total = total + long_weights[i] * x
        sums.append(total)
        if i < len(blocks) - 1:
            s = gates[i] * s + x
    normed = [final_norm(t) for t in sums]
    return normed[-1], torch.stack(normed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_input_norms", (True, False), ids=("input_norms", "no_input_norms"))
def test_hybrid_matches_a_plain_loop_forward_probe_and_every_gradient(backend, with_input_norms):
    blocks, input_norms = make_parts(3, "rmsnorm", with_input_norms)
    final_norm = make_norm("layernorm").to(DEVICE)
    long = LongConnections(blocks, input_norms, final_norm, backend=backend, gates="learned", gate_init=0.3,
                           long_weights=True)
    with torch.no_grad():
        for p in [*long.gates, *long.long_weights]:
            p.copy_(torch.rand(()) + 0.2)
    assert [n for n, _ in long.named_parameters() if "gate" in n or "long" in n] == \
        ["gates.0", "gates.1", "long_weights.0", "long_weights.1", "long_weights.2"]
    x0 = torch.randn(2, 5, DIM, device=DEVICE, requires_grad=True)
    params = [x0, *long.parameters()]
    out, probed = long(x0), long.probe(x0)
    expected_out, expected_probe = hybrid_loop(x0, long.blocks, input_norms, final_norm, long.gates, long.long_weights)
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probed, expected_probe, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads([out, probed], params), grads([expected_out, expected_probe], params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(long.truncate(2)(x0), probed[2], rtol=1e-5, atol=1e-6)


def test_hybrid_options_are_checked():
    with pytest.raises(ValueError, match=r"long_weights needs the hybrid .*, got gates=None"):
        LongConnections([nn.Linear(4, 4)] * 2, long_weights=True)
    with pytest.raises(ValueError, match=r"gates must be None \(the ACN\) or 'learned' \(the hybrid\), got \[tensor"):
        LongConnections([nn.Linear(4, 4)] * 2, gates=[torch.zeros(()), torch.zeros(())])
    with pytest.raises(ValueError, match=r"gate_init must be a real number"):
        LongConnections([nn.Linear(4, 4)] * 2, gates="learned", gate_init=None)
    with pytest.raises(TypeError, match=r"unknown hybrid option 'gate_int': the options are \['gate_scope', "):
        LongConnections([nn.Linear(4, 4)] * 2, gates="learned", gate_int=0.3)
    with pytest.raises(ValueError, match=r"gate_scope must be one of \('unit', 'block'\), got 'layer'"):
        LongConnections([nn.Linear(4, 4)] * 2, gates="learned", gate_scope="layer")


def test_without_a_final_norm_it_is_the_plain_sum():
    blocks = [nn.Linear(DIM, DIM) for _ in range(2)]
    x0 = torch.randn(4, DIM)
    long = LongConnections(blocks)
    x1 = blocks[0](x0)
    torch.testing.assert_close(long(x0), x0 + x1 + blocks[1](x1))
    torch.testing.assert_close(long.probe(x0)[1], x0 + x1)


def test_truncate_shares_parameters_and_equals_probe():
    blocks, input_norms = make_parts(4, "layernorm", True)
    long = LongConnections(blocks, input_norms, make_norm("layernorm"), backend="reference")
    x0 = torch.randn(3, DIM)
    probed = long.probe(x0)
    for k in range(5):
        shallow = long.truncate(k)
        assert shallow.depth == k and {id(p) for p in shallow.parameters()} <= {id(p) for p in long.parameters()}
        torch.testing.assert_close(shallow(x0), probed[k])
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 4\], got 5"):
        long.truncate(5)


def test_block_keyword_arguments_reach_every_block():
    class Masked(nn.Module):
        def forward(self, x, mask):
            return x * mask

    mask = torch.tensor([1.0, 0.0])
    out = LongConnections([Masked(), Masked()])(torch.ones(3, 2), mask=mask)
    torch.testing.assert_close(out, torch.tensor([[3.0, 1.0]] * 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_with_fullgraph(backend):
    blocks, input_norms = make_parts(2, "layernorm", True)
    long = LongConnections(blocks, input_norms, make_norm("layernorm").to(DEVICE), backend=backend)
    x0 = torch.randn(4, DIM, device=DEVICE)
    compiled = torch.compile(long, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x0), long(x0))


def test_unsupported_norms_and_mismatched_lengths_are_named():
    with pytest.raises(ValueError, match=r"final_norm must be nn.LayerNorm, nn.RMSNorm or a LayerNorm with weight, "
                                         r"bias and eps, got BatchNorm1d"):
        LongConnections([nn.Linear(4, 4)], final_norm=nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"input_norms\[0\] must normalize the last dimension only, got "
                                         r"normalized_shape \(3, 4\)"):
        LongConnections([nn.Linear(4, 4)], [nn.LayerNorm((3, 4))])
    with pytest.raises(ValueError, match=r"input_norms must have one norm per block \(2\), got 1"):
        LongConnections([nn.Linear(4, 4)] * 2, [nn.LayerNorm(4)])
    with pytest.raises(ValueError, match="backend"):
        LongConnections([nn.Linear(4, 4)], backend="fast")


def test_gates_given_as_a_misspelt_string_are_refused_naming_it():
    with pytest.raises(ValueError, match=r"gates must be None \(the ACN\) or 'learned' \(the hybrid\), got 'learnt'"):
        LongConnections([nn.Linear(4, 4) for _ in range(3)], gates="learnt")
