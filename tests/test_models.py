"""The model semantics of ACN-NOTES section 1, checked against hand-written recurrences."""
import pytest
import torch
import torch.nn.functional as F

from acn_kernels import GPT, LongConnections
from acn_kernels.models import CONNECTIVITIES, MLP, Encoder, Mixer, ViT

BATCH = 3


def make(family: str, connectivity: str, depth: int = 3, **hybrid):
    """A small model of `family` and its inputs; `hybrid`: gate_init, learn_gates, long_weights (or backend)."""
    if family == "mlp":
        return MLP(7, 12, depth, 5, connectivity=connectivity, **hybrid), torch.randn(BATCH, 7)
    if family == "mixer":
        return (Mixer(6, 2, 3, 8, depth, token_dim=5, channel_dim=11, num_classes=4, connectivity=connectivity,
                      **hybrid), torch.randn(BATCH, 3, 6, 6))
    if family == "vit":
        return (ViT(6, 3, 2, 8, depth, heads=2, mlp_dim=13, num_classes=4, connectivity=connectivity, **hybrid),
                torch.randn(BATCH, 2, 6, 6))
    return (Encoder(11, 9, 8, depth, heads=2, mlp_dim=13, num_classes=4, connectivity=connectivity, **hybrid),
            torch.randint(0, 11, (BATCH, 7)))


FAMILIES = ("mlp", "mixer", "vit", "encoder")
HIDDEN_SHAPES = {"mlp": (BATCH, 12), "mixer": (BATCH, 10, 8), "vit": (BATCH, 4, 8), "encoder": (BATCH, 7, 8)}
every_model = pytest.mark.parametrize("family", FAMILIES)
every_connectivity = pytest.mark.parametrize("connectivity", CONNECTIVITIES)


def block_outputs(model, inputs):
    """x_0 = embed(inputs), x_i = block_i(x_{i-1}): the chain without any long connection."""
    xs = [model.embed(inputs)]
    for block in model.blocks:
        xs.append(block(xs[-1]))
    return xs


@every_model
def test_acn_output_is_head_of_the_sum_of_all_layer_outputs(family):
    model, inputs = make(family, "acn")
    xs = block_outputs(model, inputs)
    assert all(x.abs().sum() > 0 for x in xs)
    expected = model.readout(model.final_norm(sum(xs)))
    torch.testing.assert_close(model(inputs), expected)


@every_model
def test_acn_partial_sum_differences_are_block_outputs(family):
    model, inputs = make(family, "acn", depth=4)
    sums = model.partial_sums(inputs)
    assert sums.shape == (5, *HIDDEN_SHAPES[family])
    x_prev = sums[0]
    torch.testing.assert_close(x_prev, model.embed(inputs))
    for k, block in enumerate(model.blocks, start=1):
        x_k = sums[k] - sums[k - 1]
        torch.testing.assert_close(x_k, block(x_prev), rtol=1e-5, atol=1e-5)
        x_prev = x_k


@every_model
@pytest.mark.parametrize("connectivity", ("residual", "ffn"))
def test_partial_sums_of_chains_are_the_state_after_k_blocks(family, connectivity):
    model, inputs = make(family, connectivity)
    torch.testing.assert_close(model.partial_sums(inputs), torch.stack(block_outputs(model, inputs)))


def randomize_scalars(model):
    """Gates and long weights away from their starting values, so that a wrong one shows."""
    with torch.no_grad():
        for p in [*model.gates, *(model.long_weights or ())]:
            p.copy_(torch.rand(()) * 1.2 - 0.1)


def hybrid_by_hand(model, inputs):
    """The hybrid of the definition over the model's own blocks: s_0 = x_0, x_i = block_i(s_{i-1}),
    s_i = g_i s_{i-1} + x_i, y = x_0 + b_1 x_1 + ... + b_L x_L; returns every partial sum and the logits."""
    s = y = model.embed(inputs)
    sums = [y]
    for i, block in enumerate(model.blocks):
        x = block(s)
        y = y + (model.long_weights[i] * x if model.long_weights is not None else x)
        sums.append(y)
        if i < model.depth - 1:
            s = model.gates[i] * s + x
    return torch.stack(sums), model.readout(model.final_norm(y))


@every_model
@pytest.mark.parametrize("long_weights", (False, True))
def test_hybrid_follows_its_recurrence(family, long_weights):
    model, inputs = make(family, "hybrid", depth=4, long_weights=long_weights)
    randomize_scalars(model)
    sums, logits = hybrid_by_hand(model, inputs)
    torch.testing.assert_close(model.partial_sums(inputs), sums)
    torch.testing.assert_close(model(inputs), logits)
    assert [n for n, _ in model.named_parameters() if "gate" in n] == ["gates.0", "gates.1", "gates.2"]
    assert sum(1 for n, _ in model.named_parameters() if n.startswith("long_weights.")) == (4 if long_weights else 0)


@every_model
def test_hybrid_at_gate_zero_is_its_acn_twin_and_their_checkpoints_load_both_ways(family):
    torch.manual_seed(0)
    acn, inputs = make(family, "acn")
    hybrid, _ = make(family, "hybrid", gate_init=0.0)
    missing, unexpected = hybrid.load_state_dict(acn.state_dict(), strict=False)
    assert sorted(missing) == ["gates.0", "gates.1"] and unexpected == []
    assert torch.equal(hybrid(inputs), acn(inputs))
    acn.load_state_dict(hybrid.state_dict(), strict=False)
    assert set(hybrid.state_dict()) - set(acn.state_dict()) == {"gates.0", "gates.1"}


def test_a_hybrid_saved_with_0_dim_scalars_loads_into_the_one_element_ones():
    """The scalars were 0-dim parameters before FSDP2 support; such a checkpoint still loads, strictly."""
    torch.manual_seed(0)
    saved, inputs = make("mlp", "hybrid", long_weights=True, x0_weight=True, gate_init=0.3)
    with torch.no_grad():
        for p in saved.parameters():
            if p.shape == (1,):
                p.uniform_(0.1, 0.9)
    old = {name: value.reshape(()) if value.shape == (1,) else value for name, value in saved.state_dict().items()}
    assert {name for name, value in old.items() if value.dim() == 0} >= {"gates.0", "long_weights.0", "x0_weight.0"}
    fresh, _ = make("mlp", "hybrid", long_weights=True, x0_weight=True, gate_init=0.3)
    fresh.load_state_dict(old)
    assert all(p.shape == (1,) for name, p in fresh.named_parameters() if name.split(".")[0] in
               ("gates", "long_weights", "x0_weight"))
    assert torch.equal(fresh(inputs), saved(inputs))


def test_hybrid_gate_gradients_agree_with_central_finite_differences():
    torch.manual_seed(0)
    model, inputs = make("vit", "hybrid", depth=4, long_weights=True, backend="reference")  # float64
    model = model.double()
    randomize_scalars(model)
    inputs = inputs.double()
    scalars = [*model.gates, *model.long_weights]

    def loss():
        return model(inputs).square().mean()
    analytic = torch.autograd.grad(loss(), scalars)
    step = 1e-6
    for p, grad in zip(scalars, analytic):
        with torch.no_grad():
            p += step
            above = loss()
            p -= 2 * step
            below = loss()
            p += step
        torch.testing.assert_close(grad, ((above - below) / (2 * step)).reshape(1), rtol=1e-6, atol=1e-9)


def test_hybrid_gates_can_be_frozen():
    model, inputs = make("mlp", "hybrid", gate_init=0.25, learn_gates=False)
    assert all(not g.requires_grad and g.item() == 0.25 for g in model.gates)
    model(inputs).sum().backward()
    assert all(g.grad is None for g in model.gates) and model.blocks[0].linear.weight.grad is not None


def mlp_step(block, x):
    return F.gelu(F.linear(x, block.linear.weight, block.linear.bias))


def test_mlp_connectivities_follow_their_recurrences():
    for connectivity in ("acn", "residual", "ffn"):  # the hybrid's: test_hybrid_follows_its_recurrence
        model, inputs = make("mlp", connectivity)
        sums = model.partial_sums(inputs)
        x = model.input_proj(inputs)
        y = x
        for k, block in enumerate(model.blocks, start=1):
            if connectivity == "residual":
                x = x + mlp_step(block, x)
                expected = x
            else:
                x = mlp_step(block, x)
                y = y + x
                expected = y if connectivity == "acn" else x
            torch.testing.assert_close(sums[k], expected)


@pytest.mark.parametrize("family", ("vit", "encoder"))
@every_connectivity
def test_transformer_blocks_have_skips_only_when_residual(family, connectivity):
    model, inputs = make(family, connectivity)
    block = model.blocks[0]
    x = model.embed(inputs)
    if family == "vit":
        h = block.attn(block.norm1(x)) + (x if connectivity == "residual" else 0)
        expected = block.mlp(block.norm2(h)) + (h if connectivity == "residual" else 0)
    else:
        h = block.norm1(block.attn(x) + (x if connectivity == "residual" else 0))
        expected = block.norm2(block.mlp(h) + (h if connectivity == "residual" else 0))
    torch.testing.assert_close(block(x), expected)


@every_connectivity
def test_mixer_block_keeps_the_authors_tail_skip(connectivity):
    model, inputs = make("mixer", connectivity)
    block = model.blocks[0]
    x = model.embed(inputs)
    skip = connectivity == "residual"
    mixed = block.token_mlp(block.token_norm(x).transpose(1, 2)).transpose(1, 2) + (x if skip else 0)
    channels = block.channel_mlp(block.channel_norm(mixed)) + (mixed if skip else 0)
    expected = block.tail_norm(torch.relu(block.tail(channels) + x))
    torch.testing.assert_close(block(x), expected)


@every_model
@every_connectivity
def test_probe_matches_truncate_at_every_depth(family, connectivity):
    model, inputs = make(family, connectivity)
    model.eval()
    logits = model.probe(inputs)
    assert logits.shape == (model.depth + 1, BATCH, model.classifier.out_features)
    for k in range(model.depth + 1):
        torch.testing.assert_close(model.truncate(k)(inputs), logits[k])
    torch.testing.assert_close(logits[-1], model(inputs))


def test_truncate_shares_parameters_and_leaves_the_original_whole():
    model, inputs = make("vit", "acn", depth=4)
    short = model.truncate(2)
    assert short.depth == 2 and model.depth == 4
    assert short.blocks[1].attn.qkv.weight is model.blocks[1].attn.qkv.weight
    assert short.classifier.weight is model.classifier.weight
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    torch.testing.assert_close(short(inputs), model.probe(inputs)[2])
    assert len(list(short.parameters())) < len(list(model.parameters()))


def test_acn_gradient_fans_out_to_every_layer():
    """dLoss/dx_i = g + J_{i+1}^T dLoss/dx_{i+1}, and dLoss/dx_L = g, with g = dLoss/dy."""
    model, inputs = make("mlp", "acn", depth=4)
    xs = [model.embed(inputs)]
    for block in model.blocks:
        xs.append(block(xs[-1]))
    for x in xs:
        x.retain_grad()
    y = sum(xs)
    y.retain_grad()
    model.readout(model.final_norm(y)).pow(2).sum().backward()
    g = y.grad
    torch.testing.assert_close(xs[-1].grad, g)
    for i in range(len(xs) - 2, -1, -1):
        x_i = xs[i].detach().requires_grad_(True)
        (vjp,) = torch.autograd.grad(model.blocks[i](x_i), x_i, grad_outputs=xs[i + 1].grad)
        torch.testing.assert_close(xs[i].grad, g + vjp, rtol=1e-5, atol=1e-6)


@every_model
def test_same_seed_same_model_and_outputs(family):
    torch.manual_seed(123)
    first, inputs = make(family, "acn")
    torch.manual_seed(123)
    second, _ = make(family, "acn")
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(first(inputs), second(inputs))
    torch.manual_seed(124)
    third, _ = make(family, "acn")
    assert not torch.equal(first.classifier.weight, third.classifier.weight)


def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match=r"connectivity must be one of \('acn', 'residual', 'ffn', 'hybrid'\), "
                                         r"got 'dense'"):
        MLP(4, 8, 2, 3, connectivity="dense")
    with pytest.raises(ValueError, match=r"depth must be an integer >= 1, got 0"):
        ViT(8, 4, 3, 8, 0, 2, 16, 10)
    with pytest.raises(ValueError, match=r"image_size must be divisible by patch_size=3, got image_size=8"):
        Mixer(8, 3, 3, 8, 2, 4, 16, 10)
    with pytest.raises(ValueError, match=r"dim must be divisible by heads=3, got dim=8"):
        Encoder(10, 8, 8, 2, 3, 16, 2)
    with pytest.raises(ValueError, match=r"activation must be one of .*, got 'tanh'"):
        MLP(4, 8, 2, 3, activation="tanh")
    with pytest.raises(ValueError, match=r"long_weights needs the hybrid .*, got connectivity='acn'"):
        MLP(4, 8, 2, 3, long_weights=True)
    with pytest.raises(ValueError, match=r"gate_init must be a real number .*, got 'half'"):
        MLP(4, 8, 2, 3, connectivity="hybrid", gate_init="half")
    with pytest.raises(ValueError, match=r"depth must be an integer >= 1, got True"):
        MLP(4, 8, True, 3)
    model, inputs = make("mlp", "acn")
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 3\], got 4"):
        model.truncate(4)
    with pytest.raises(ValueError, match=r"inputs must be a floating-point tensor of shape \(batch, 7\), got "
                                         r"dtype torch.float32 and shape \(3, 6\)"):
        model(inputs[:, :6])
    with pytest.raises(ValueError, match=r"inputs must be a floating-point .*, got dtype torch.int64 and shape \(3, 7\)"):
        model(inputs.long())
    vit, images = make("vit", "acn")
    with pytest.raises(ValueError, match=r"images must be a floating-point tensor of shape \(batch, 2, 6, 6\), got "
                                         r"dtype torch.float32 and shape \(3, 2, 6, 5\)"):
        vit(images[..., :5])
    with pytest.raises(ValueError, match=r"images must be a floating-point .*, got list"):
        vit(images.tolist())
    encoder, tokens = make("encoder", "acn")
    with pytest.raises(ValueError, match=r"length <= 9"):
        encoder(torch.randint(0, 11, (2, 10)))
    with pytest.raises(ValueError, match=r"inputs must have the model's dtype torch.float32 \(its parameters'; convert "
                                         r"the model with .to\(torch.float64\) or the inputs .*got torch.float64"):
        model(inputs.double())
    with pytest.raises(ValueError, match=r"images must have the model's dtype torch.float32 .*got torch.float16"):
        vit(images.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts what it is given
        assert model(inputs.half()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dim // heads must be even for rotary positions \(they rotate pairs of "
                                         r"features\), got dim=12 // heads=4 = 3"):
        GPT(16, 8, 12, 1, 4, positions="rotary")
    acn = LongConnections([torch.nn.Linear(8, 8)], [torch.nn.LayerNorm(8)], torch.nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"x0 must have 8 features in its last dimension \(input_norms\[0\] normalizes "
                                         r"8\), got shape \(2, 6\)"):
        acn(torch.randn(2, 6))
    for call in (acn.probe, acn.truncate(0), lambda x: acn.early_exit(x, lambda h: h, 0.5)):
        with pytest.raises(ValueError, match=r"x0 must have 8 features .*\(final_norm normalizes 8\)|input_norms"):
            call(torch.randn(2, 6))


@every_model
@pytest.mark.parametrize("connectivity, hybrid", [("acn", {}), ("residual", {}), ("ffn", {}),
                                                  ("hybrid", {"long_weights": True})])
def test_a_truncated_state_dict_loads_strictly_into_a_model_built_at_that_depth(family, connectivity, hybrid):
    model, inputs = make(family, connectivity, depth=4, **hybrid)
    if connectivity == "hybrid":
        randomize_scalars(model)
    model.eval()
    short = model.truncate(2)
    built, _ = make(family, connectivity, depth=2, **hybrid)
    built.load_state_dict(short.state_dict())  # strict: no key missing or left over
    torch.testing.assert_close(built.eval()(inputs), model.probe(inputs)[2], rtol=1e-5, atol=1e-5)
