"""Drop-in use: backends, torch.library registration, torch.compile, autocast, checkpointing, and
end-to-end training steps of AC models on the fused ops (training across processes: test_distributed)."""

import pytest
import torch
import torch.nn.functional as F

from acn_kernels import GPT, MLP, Encoder, Mixer, ViT, linear_act_accumulate
from acn_kernels.ops import feed_forward
from acn_kernels.backend import TRITON_INTERPRETED
from op_harness import DEVICE, FUSED_BACKENDS, randn

needs_triton_here = pytest.mark.skipif(DEVICE == "cpu" and not TRITON_INTERPRETED,
                                       reason="Triton runs on this machine's CPU only under TRITON_INTERPRET=1")
pytestmark = needs_triton_here


def make(family: str, backend: str, connectivity: str = "acn", depth: int = 3):
    """A small model (a hybrid with long weights and its gates away from 0.5) with inputs and labels."""
    torch.manual_seed(0)
    hybrid = {"long_weights": True, "gate_init": 0.3} if connectivity == "hybrid" else {}
    if family == "mlp":
        model, inputs = MLP(12, 32, depth, 5, connectivity=connectivity, backend=backend, **hybrid), randn(6, 12)
    elif family == "mixer":
        model = Mixer(8, 2, 3, 32, depth, token_dim=16, channel_dim=48, num_classes=5, connectivity=connectivity,
                      backend=backend, **hybrid)
        inputs = randn(4, 3, 8, 8)
    elif family == "vit":
        model = ViT(8, 2, 3, 32, depth, heads=2, mlp_dim=48, num_classes=5, connectivity=connectivity,
                    backend=backend, **hybrid)
        inputs = randn(4, 3, 8, 8)
    else:
        model = Encoder(50, 12, 32, depth, heads=2, mlp_dim=48, num_classes=5, connectivity=connectivity,
                        backend=backend, **hybrid)
        inputs = torch.randint(0, 50, (4, 9), device=DEVICE)
    return model.to(DEVICE), inputs, torch.randint(0, 5, (inputs.shape[0],), device=DEVICE)


def loss_and_grads(model, inputs, labels, run=None):
    """Loss and parameter gradients of one step; `run` (a compiled model) replaces model's call."""
    model.zero_grad()
    loss = F.cross_entropy((run if run is not None else model)(inputs), labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


FAMILIES = ("mlp", "mixer", "vit", "encoder")


# ----------------------------------------------------------------------------- backends

GRAD_RTOL = 1e-4 if DEVICE == "cpu" else 1e-3  # GPUs reorder sums


def step_matches_reference(family, backend, connectivity="acn"):
    """One loss and backward on `backend` against the reference, from the same initialization."""
    fused, inputs, labels = make(family, backend, connectivity)
    ref, _, _ = make(family, "reference", connectivity)
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused_loss, fused_grads = loss_and_grads(fused, inputs, labels)
    ref_loss, ref_grads = loss_and_grads(ref, inputs, labels)
    torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=GRAD_RTOL, atol=1e-5, msg=name)
    return fused, ref, inputs, labels


@pytest.mark.parametrize("connectivity", ("acn", "residual", "ffn", "hybrid"))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_and_reference_models_agree(family, backend, connectivity):
    fused, ref, inputs, _ = step_matches_reference(family, backend, connectivity)
    assert fused.backend == backend and ref.backend == "reference"
    torch.testing.assert_close(fused.probe(inputs), ref.probe(inputs), rtol=GRAD_RTOL, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_twin_runs_its_mlps_on_the_fused_op(family, monkeypatch):
    """acn, residual and ffn differ only in their connections: the same fused MLPs in all three, and
    none on the reference backend."""
    from acn_kernels.models import layers, mlp

    calls = []

    def counting(op):
        def counted(*args, **kwargs):
            calls.append(kwargs["backend"])
            return op(*args, **kwargs)
        return counted
    monkeypatch.setattr(layers, "feed_forward", counting(feed_forward))
    monkeypatch.setattr(mlp, "linear_act_accumulate", counting(linear_act_accumulate))
    mlps = {}
    for backend in ("triton", "reference"):
        for connectivity in ("acn", "residual", "ffn"):
            model, inputs, _ = make(family, backend, connectivity)
            calls.clear()
            model(inputs)
            mlps[backend, connectivity] = len(calls)
    per_block = 2 if family == "mixer" else 1  # the Mixer's token and channel MLPs
    assert mlps["triton", "acn"] == mlps["triton", "residual"] == mlps["triton", "ffn"] == 3 * per_block
    assert mlps["reference", "acn"] == mlps["reference", "residual"] == mlps["reference", "ffn"] == 0


def test_backend_choice_is_visible_and_never_silent():
    model, _, _ = make("vit", "auto")
    # the interpreter is on in the tests, or a GPU is there: Triton norms, cuBLAS GEMMs until measured
    assert model.backend == "mixed"
    assert make("vit", "cublas")[0].backend == "cublas"
    residual, _, _ = make("vit", "triton", connectivity="residual")
    assert residual.backend == "triton"  # its MLPs run on the fused op
    cuda, inputs, _ = make("mlp", "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' needs the CUDA extension"):
        cuda(inputs)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'triton', 'cublas', 'cuda'\)"):
        MLP(4, 8, 2, 3, backend="cudnn")


def test_checkpoint_loads_across_backends():
    fused, inputs, _ = make("mixer", "triton")
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    ref, _, _ = make("mixer", "reference")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(1.0)  # make sure the load, not the seed, makes them equal
    ref.load_state_dict(state)
    torch.testing.assert_close(ref(inputs), fused(inputs), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- torch.library

def opcheck_cases(namespace: str = "acn_kernels"):
    x, y, w, b = randn(5, 24), randn(5, 24), randn(24), randn(24)
    xs = randn(3, 4, 24)
    wl, bl, yl = randn(16, 24, scale=0.2), randn(16), randn(5, 16)
    grads = [t.requires_grad_() for t in (x, y, w, b, xs, wl, bl, yl)]
    x, y, w, b, xs, wl, bl, yl = grads
    ops = getattr(torch.ops, namespace)
    rstd, mean = randn(5).abs() + 0.5, randn(5)
    gate, long_weight = (randn().requires_grad_() for _ in range(2))
    return {
        "accumulate_norm_fwd": (ops.accumulate_norm_fwd.default, (x, y, w, b, 1e-5, True, True)),
        "accumulate_norm_fwd_start": (ops.accumulate_norm_fwd.default, (x, None, w, None, 1e-5, False, False)),
        "accumulate_norm_bwd": (ops.accumulate_norm_bwd.default,
                                (randn(5, 24), randn(5, 24), randn(5, 24), randn(24), mean, rstd, True, True, None)),
        "hybrid_accumulate_norm_fwd": (ops.hybrid_accumulate_norm_fwd.default,
                                       (x, y, None, gate, w, b, long_weight, 1e-5, True)),
        "hybrid_accumulate_norm_fwd_rms": (ops.hybrid_accumulate_norm_fwd.default,
                                           (x, y, randn(5, 24).requires_grad_(), gate, w, None, None, 1e-5, False)),
        "hybrid_accumulate_norm_bwd": (ops.hybrid_accumulate_norm_bwd.default,
                                       (randn(5, 24), randn(5, 24), randn(5, 24), randn(5, 24), randn(5, 24),
                                        randn(5, 24), randn(), randn(24), randn(), mean, rstd, True, True)),
        "probe_norm_fwd": (ops.probe_norm_fwd.default, (xs, w, b, 1e-5, True)),
        "probe_norm_bwd": (ops.probe_norm_bwd.default,
                           (randn(3, 4, 24), randn(3, 4, 24), randn(24), randn(3, 4), randn(3, 4).abs() + 0.5,
                            True, True)),
        "linear_act_accumulate_fwd": (ops.linear_act_accumulate_fwd.default, (x, wl, bl, yl, "gelu")),
        "linear_act_accumulate_fwd_relu": (ops.linear_act_accumulate_fwd.default, (x, wl, None, None, "relu")),
        "activation_backward": (ops.activation_backward.default,
                                (randn(5, 16), randn(5, 16), randn(5, 16), "silu", torch.float32)),
        **({} if namespace != "acn_kernels" else {  # feed_forward and linear have no CUDA twin
            "feed_forward_fwd": (ops.feed_forward_fwd.default, (x, wl, bl, randn(7, 16, scale=0.2).requires_grad_(),
                                                                None, "gelu_tanh")),
            "times_activation_grad": (ops.times_activation_grad.default,
                                      (randn(5, 7), randn(7, 16), randn(5, 16), "gelu")),
            "linear_fwd": (ops.linear_fwd.default, (x, wl, bl)),
            "weight_grad": (ops.weight_grad.default, (randn(5, 16), randn(5, 24), True)),
            "weight_grad_without_bias": (ops.weight_grad.default, (randn(5, 16), randn(5, 24), False))}),
    }


TRITON_ONLY = ("feed_forward_fwd", "times_activation_grad", "linear_fwd", "weight_grad", "weight_grad_without_bias")
OPCHECKS = [pytest.param("acn_kernels", case, id=f"triton-{case}") for case in opcheck_cases()] + \
    [pytest.param("acn_kernels_cuda", case, id=f"cuda-{case}", marks=pytest.mark.gpu)
     for case in opcheck_cases() if case not in TRITON_ONLY]


@pytest.mark.parametrize("namespace,case", OPCHECKS)
def test_opcheck(case, namespace):
    op, args = opcheck_cases(namespace)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_model_matches_eager_with_no_graph_break(family):
    torch._dynamo.reset()
    model, inputs, labels = make(family, "triton")
    eager_loss, eager_grads = loss_and_grads(model, inputs, labels)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if family != "mlp" else "inductor")
    loss, grads = loss_and_grads(model, inputs, labels, run=compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- autocast, checkpointing

@pytest.mark.parametrize("family", ("mlp", "vit"))
def test_autocast_matches_the_reference_under_autocast(family):
    device_type = "cuda" if DEVICE == "cuda" else "cpu"
    fused, inputs, labels = make(family, "triton")
    ref, _, _ = make(family, "reference")
    results = []
    for model in (fused, ref):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            logits = model(inputs)
            loss = F.cross_entropy(logits.float(), labels)
        model.zero_grad()
        loss.backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (fused_logits, fused_grads), (ref_logits, ref_grads) = results
    assert fused_logits.dtype == ref_logits.dtype
    torch.testing.assert_close(fused_logits.float(), ref_logits.float(), rtol=0.05, atol=0.05)
    for name in ref_grads:
        scale = ref_grads[name].abs().max().clamp(min=1e-3)
        assert (fused_grads[name] - ref_grads[name]).abs().max() <= 0.1 * scale, name


@pytest.mark.parametrize("family", ("mlp", "mixer"))
def test_gradient_checkpointing_gives_the_same_gradients(family):
    model, inputs, labels = make(family, "triton")
    _, plain = loss_and_grads(model, inputs, labels)
    model.gradient_checkpointing = True
    _, checkpointed = loss_and_grads(model, inputs, labels)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("family", ("vit", "mixer"))
def test_training_steps_on_triton_match_the_reference(family):
    fused, ref, inputs, labels = step_matches_reference(family, "triton")
    for model in (fused, ref):
        # Adam turns gradient noise into full-size steps where the true gradient is zero: the key
        # bias (softmax ignores it) and the token-MLP output bias (the next LayerNorm removes it)
        # get gradients of 1e-7 to 1e-9 that differ in sign between any two summation orders.
        # eps=1e-4 keeps those steps at noise level; every real gradient here is above 1e-3.
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4)
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_readme_one_acn_layer_in_your_own_model():
    """The README's example: an ACN chain written with accumulate_norm equals the plain sum."""
    from acn_kernels import accumulate_norm

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3)).to(DEVICE)
    norms = torch.nn.ModuleList(torch.nn.LayerNorm(16) for _ in range(3)).to(DEVICE)
    final_norm = torch.nn.LayerNorm(16).to(DEVICE)
    x0 = randn(5, 16)

    x, y = x0, None
    for block, norm in zip(blocks, norms):
        y, h = accumulate_norm(x, y, norm.weight, norm.bias, backend="triton")
        x = block(h)
    _, out = accumulate_norm(x, y, final_norm.weight, final_norm.bias, normalize="sum", backend="triton")

    xs = [x0]
    for block, norm in zip(blocks, norms):
        xs.append(block(norm(xs[-1])))
    torch.testing.assert_close(out, final_norm(sum(xs)), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("connectivity", ("acn", "hybrid"))
def test_compiled_gpt_matches_eager_with_no_graph_break(connectivity):
    """Forward, backward and cached generation steps under fullgraph; the token range is checked on
    the device there (a host-side check would break the graph)."""
    from acn_kernels.models.gpt import KVCache

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(vocab_size=40, max_len=16, dim=32, depth=2, heads=2, connectivity=connectivity,
                backend="reference").to(DEVICE)
    tokens = torch.randint(0, 40, (2, 9), device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads = lm_loss_and_grads(model, tokens)
    loss, grads = lm_loss_and_grads(compiled, tokens, model)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        cache, eager_cache = KVCache(), KVCache()
        torch.testing.assert_close(compiled(tokens, cache), model(tokens, eager_cache))
        for _ in range(2):
            new = model(tokens[:, -1:], None).argmax(-1)
            torch.testing.assert_close(compiled(new, cache), model(new, eager_cache))
        with pytest.raises(RuntimeError, match=r"tokens must be in \[0, 40\)"):
            compiled(torch.full((2, 3), 45, device=DEVICE))


def lm_loss_and_grads(run, tokens, model=None):
    model = model if model is not None else run
    model.zero_grad()
    logits = run(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
