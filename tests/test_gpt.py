"""The GPT family: the AC-GPT recurrence by hand, causality, probe against truncate and forward, the KV
cache, generation, per-position early exit, the fused backend against the reference for every
connectivity and every norm, MLP and position choice, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from acn_kernels import GPT
from acn_kernels.models.gpt import KVCache
from op_harness import DEVICE, FUSED_BACKENDS

VOCAB, MAX_LEN = 37, 24
CONNECTIVITIES = ("acn", "residual", "ffn", "hybrid")
# every choice of norm, MLP and positions at least once, and each pairing of them
OPTIONS = [dict(norm="layernorm", mlp="gelu", positions="learned"),
           dict(norm="rmsnorm", mlp="swiglu", positions="rotary"),
           dict(norm="rmsnorm", mlp="gelu", positions="rotary"),
           dict(norm="layernorm", mlp="swiglu", positions="learned")]
OPTION_IDS = ["-".join(o.values()) for o in OPTIONS]


def make(connectivity="acn", backend="reference", depth=3, **options) -> GPT:
    torch.manual_seed(0)
    hybrid = {"gate_init": 0.3, "long_weights": True} if connectivity == "hybrid" else {}
    return GPT(VOCAB, MAX_LEN, 32, depth, 4, connectivity=connectivity, backend=backend, **hybrid, **options).to(DEVICE)


def tokens(batch=2, positions=11, seed=1):
    return torch.randint(0, VOCAB, (batch, positions), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_ac_gpt_is_the_authors_recurrence():
    """y = x_0; a_i = Attn_i(norm1_i(x_{i-1})); y += a_i; m_i = MLP_i(norm2_i(a_i)); y += m_i; x_i = m_i."""
    model = make("acn")
    t = tokens()
    x = y = model.embed(t)
    for block in model.blocks:
        a = block.attn(block.norm1(x))
        m = block.mlp(block.norm2(a))
        y, x = y + a + m, m
    torch.testing.assert_close(model(t), model.lm_head(model.final_norm(y)))
    assert model.probe(t).shape == (4, 2, 11, VOCAB)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_causal_and_probe_agrees_with_forward_and_truncate(connectivity, options):
    model = make(connectivity, **options).eval()
    t = tokens()
    logits = model(t)
    changed = t.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7], rtol=0, atol=0)  # later tokens: no effect
    probed = model.probe(t)
    torch.testing.assert_close(probed[-1], logits, rtol=1e-5, atol=1e-5)
    for k in range(model.depth + 1):
        torch.testing.assert_close(model.truncate(k)(t), probed[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("options", OPTIONS[:2], ids=OPTION_IDS[:2])
def test_generation_with_and_without_the_cache_gives_the_same_tokens(connectivity, options):
    model = make(connectivity, **options).eval()
    prompt = tokens(positions=5)
    greedy = model.generate(prompt, 10)
    assert greedy.shape == (2, 15) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, model.generate(prompt, 10, use_cache=False))
    sampled = [model.generate(prompt, 10, do_sample=True, temperature=0.8, top_k=5, use_cache=cache,
                              generator=torch.Generator(DEVICE).manual_seed(3)) for cache in (True, False)]
    assert torch.equal(*sampled) and not torch.equal(sampled[0], greedy)


def test_a_cache_continues_a_prefix_with_several_new_positions():
    model = make("hybrid", norm="rmsnorm", positions="rotary").eval()
    t, cache = tokens(), KVCache()
    first, rest = model(t[:, :6], cache), model(t[:, 6:], cache)
    assert cache.length == 11
    torch.testing.assert_close(torch.cat([first, rest], 1), model(t), rtol=1e-5, atol=1e-5)


def test_early_exit_per_position_takes_the_first_confident_depth():
    model = make("acn").eval()
    t = tokens()
    probed = model.probe(t)
    top = torch.softmax(probed, -1).amax(-1)
    threshold = top.median().item()
    logits, used = model.early_exit(t, threshold)
    assert used.shape == (2, 11) and len(used.unique()) > 1
    for b, p in zip(*torch.where(used >= 0)):
        k = used[b, p].item()
        assert (top[:k, b, p] < threshold).all() and (k == model.depth or top[k, b, p] >= threshold)
        torch.testing.assert_close(logits[b, p], probed[k, b, p])
    assert model.early_exit(t, 0.0)[1].eq(0).all() and model.early_exit(t, 2.0)[1].eq(3).all()


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_backend_matches_the_reference_in_loss_and_every_gradient(connectivity, options, backend):
    t = tokens(batch=3, positions=9)
    losses, grads = [], []
    for model in (make(connectivity, backend, **options), make(connectivity, "reference", **options)):
        loss = F.cross_entropy(model(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    names = [n for n, _ in make(connectivity, **options).named_parameters()]
    for name, fused, reference in zip(names, *grads):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5, msg=name)


def test_tied_embeddings_and_the_hybrid_gates():
    model = make("hybrid")
    assert model.lm_head.weight is model.token_embed.weight
    assert [n for n, _ in model.named_parameters() if "gate" in n] == [f"gates.{i}" for i in range(5)]
    untied = GPT(VOCAB, MAX_LEN, 32, 2, 4, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.token_embed.weight
    assert GPT(VOCAB, MAX_LEN, 48, 1, 4, mlp="swiglu").blocks[0].mlp[0].weight.shape == (2 * 128, 48)


def test_bad_input_names_the_argument():
    model = make()
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 37\) \(vocab_size\), got values in \[0, 37\]"):
        model(torch.tensor([[0, 37]]))
    with pytest.raises(ValueError, match=r"tokens must fit max_len=24 positions, got 25"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor of shape \(batch, positions >= 1\), "
                                         r"got dtype torch.float32"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"max_new_tokens must leave the sequence within max_len=24, got 20 after 5"):
        model.generate(tokens(positions=5), 20)
    with pytest.raises(ValueError, match=r"top_k must be an integer >= 1, got 0"):
        model.generate(tokens(positions=5), 2, do_sample=True, top_k=0)
    with pytest.raises(ValueError, match=r"mlp must be one of \('gelu', 'swiglu'\), got 'relu'"):
        GPT(VOCAB, MAX_LEN, 32, 2, 4, mlp="relu")
    with pytest.raises(ValueError, match=r"positions must be one of \('learned', 'rotary'\), got 'alibi'"):
        GPT(VOCAB, MAX_LEN, 32, 2, 4, positions="alibi")


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
def test_a_truncated_state_dict_loads_strictly_into_a_gpt_built_at_that_depth(connectivity):
    model = make(connectivity, depth=4, norm="rmsnorm", mlp="swiglu", positions="rotary").eval()
    with torch.no_grad():
        for p in [*(model.gates or ()), *(model.long_weights or ())]:
            p.uniform_(-0.1, 1.1)
    built = make(connectivity, depth=2, norm="rmsnorm", mlp="swiglu", positions="rotary").eval()
    built.load_state_dict(model.truncate(2).state_dict())
    t = tokens()
    torch.testing.assert_close(built(t), model.probe(t)[2], rtol=1e-5, atol=1e-5)


def test_qkv_rows_are_head_major_and_a_state_dict_of_the_earlier_layout_loads_reordered(tmp_path):
    """Attention from qkv_weights() (each head's query, key and value rows, in that order, together: whole
    heads a tensor-parallel rank) is multi-head causal attention; a state_dict saved with every query row
    first, then the keys, then the values (version 1) loads into the same model, and one saved now loads
    unchanged after torch.save."""
    torch.manual_seed(0)
    model = GPT(VOCAB, MAX_LEN, 32, 2, 4, backend="reference").eval()
    attention, x = model.blocks[0].attn, torch.randn(2, 5, 32)
    biases = attention.qkv.bias.unflatten(0, (4, 3, 8)).unbind(1)

    def heads(weight, bias):
        return (x @ weight.T + bias.flatten()).view(2, 5, 4, 8).transpose(1, 2)
    attended = F.scaled_dot_product_attention(*map(heads, attention.qkv_weights(), biases), is_causal=True)
    torch.testing.assert_close(attention(x), attention.proj(attended.transpose(1, 2).reshape(2, 5, 32)))

    earlier = model.state_dict()
    for i in range(2):
        prefix = f"blocks.{i}.attn"
        earlier[f"{prefix}.qkv.weight"] = torch.cat(model.blocks[i].attn.qkv_weights())
        earlier[f"{prefix}.qkv.bias"] = model.blocks[i].attn.qkv.bias.unflatten(0, (4, 3, 8)).transpose(0, 1).flatten()
        earlier._metadata[prefix]["version"] = 1
    torch.save(model.state_dict(), tmp_path / "now.pt")
    for state in (earlier, torch.load(tmp_path / "now.pt")):
        torch.manual_seed(1)
        loaded = GPT(VOCAB, MAX_LEN, 32, 2, 4, backend="reference").eval()
        loaded.load_state_dict(state)
        for name, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), name


# ----------------------------------------------------------------------------- the authors' language models

AUTHORS = dict(bias=False, scaled_output_init=True, positions="rotary", norm="layernorm", mlp="gelu")
FORMS = {  # the authors' three language models (ACN-NOTES section 2b) as the package's options
    "ac-gpt": dict(connectivity="acn"),
    "h-acn": dict(connectivity="hybrid", gate_scope="block", gate_init=0.0, clamp_range=(0.0, 1.0)),
    "long-short": dict(connectivity="hybrid", gate_scope="block", long_weights=True, x0_weight=True,
                       gates_from_long_weights=True, long_weight_init=0.8),
    "lsn": dict(connectivity="hybrid", gate_scope="block", long_weights=True, x0_weight=True,  # --skipattn
                gates_from_long_weights=True, long_weight_init=0.8, skip_attention=True),
}
LONG_SHORT = ("long-short", "lsn")


def authors_forward(model: GPT, t: torch.Tensor, form: str, alphas: list) -> torch.Tensor:
    """Their forward, transcribed from the equations over the model's own submodules: per block i,
    g = 1 - alpha; x = g x + attn(ln_1(x)); x = g x + mlp(ln_2(x)); the sum takes attn + mlp (times
    alpha_{i+1} in Long_Short, which also weights x_0 by alpha_0 and gates block i with alpha_i; their
    LSN, --skipattn, keeps the attention's short path whole: x = x + attn)."""
    x = model.embed(t)
    current = alphas[0] * x if form in LONG_SHORT else x
    for i, block in enumerate(model.blocks):
        g = 0.0 if form == "ac-gpt" else 1 - alphas[i]
        attn = block.attn(block.norm1(x))
        x = (x if form == "lsn" else g * x) + attn
        mlp = block.mlp(block.norm2(x))
        x = g * x + mlp
        current = current + (alphas[i + 1] * (attn + mlp) if form in LONG_SHORT else attn + mlp)
    return model.lm_head(model.final_norm(current))


def authors_model(form: str, depth: int = 4) -> tuple:
    """(model in float64, its alphas): gates and weights drawn away from their starting values."""
    torch.manual_seed(0)
    model = GPT(VOCAB, MAX_LEN, 32, depth, 4, backend="reference", **AUTHORS, **FORMS[form]).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.shape == (1,):  # the hybrid's scalars
                p.uniform_(0.1, 0.9)
    if form == "h-acn":  # one gate per block, 1 - alpha
        alphas = [1 - g for g in model.gates]
    elif form in LONG_SHORT:
        alphas = [model.x0_weight[0], *model.long_weights]
    else:
        alphas = []
    return model, alphas


@pytest.mark.parametrize("form", FORMS)
def test_the_package_gpt_with_the_authors_options_is_their_forward_and_gradients(form):
    model, alphas = authors_model(form)
    t = tokens(batch=2, positions=9)
    ours, theirs = model(t), authors_forward(model, t, form, alphas)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    parameters = list(model.parameters())
    ours_grads = torch.autograd.grad(F.cross_entropy(ours.flatten(0, 1), t.flatten()), parameters)
    theirs_grads = torch.autograd.grad(F.cross_entropy(theirs.flatten(0, 1), t.flatten()), parameters)
    for name, a, b in zip([n for n, _ in model.named_parameters()], ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())  # no bias anywhere
    scalars = {"ac-gpt": [], "h-acn": ["gates.0", "gates.1", "gates.2", "gates.3"],
               "long-short": ["long_weights.0", "long_weights.1", "long_weights.2", "long_weights.3", "x0_weight.0"]}
    scalars["lsn"] = scalars["long-short"]
    assert sorted(n for n, p in model.named_parameters() if p.shape == (1,)) == scalars[form]


def test_the_scaled_output_projections_and_the_h_acn_start_as_the_authors_do():
    torch.manual_seed(0)
    model = GPT(VOCAB, MAX_LEN, 64, 8, 4, mlp_dim=512, backend="reference", **AUTHORS, **FORMS["h-acn"])
    for block in model.blocks:
        for weight in block.output_projections():
            assert abs(weight.std().item() - 0.02 / 4) < 0.0005  # 0.02 / sqrt(2 * 8)
        assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.001
    assert all(g.item() == 0.0 for g in model.gates)  # every alpha 1: the pure ACN
    acn = GPT(VOCAB, MAX_LEN, 64, 8, 4, mlp_dim=512, backend="reference", **AUTHORS)
    acn.load_state_dict(model.state_dict(), strict=False)  # the same weights, no gates
    torch.testing.assert_close(model.probe(tokens()), acn.probe(tokens()), rtol=0, atol=0)


def test_clamp_after_keeps_every_gate_and_weight_in_range_after_each_step():
    for form in ("h-acn", "long-short"):
        torch.manual_seed(0)
        model = GPT(VOCAB, MAX_LEN, 32, 4, 4, backend="reference", **AUTHORS,
                    **{**FORMS[form], "clamp_range": (0.0, 1.0)}).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=100.0)  # steps far outside [0, 1]
        handle = model.clamp_after(optimizer)
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(tokens()).flatten(0, 1), tokens().flatten()).backward()
            optimizer.step()
            scalars = model.long_connections.scalars.all()
            assert scalars and all(0.0 <= p.item() <= 1.0 for p in scalars)
            assert any(p.item() in (0.0, 1.0) for p in scalars)  # the clamp did act
        handle.remove()


@pytest.mark.parametrize("form", ["h-acn", "long-short", "lsn"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_the_authors_forms_on_a_fused_backend_match_the_reference(form, backend):
    t = tokens(batch=3, positions=9)
    losses, grads = [], []
    for chosen in (backend, "reference"):
        torch.manual_seed(0)
        model = GPT(VOCAB, MAX_LEN, 32, 3, 4, backend=chosen, **AUTHORS, **FORMS[form]).to(DEVICE)
        with torch.no_grad():
            for p in model.long_connections.scalars.all():
                p.fill_(0.3)
        loss = F.cross_entropy(model(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for fused, reference in zip(*grads):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["h-acn", "long-short", "lsn"])
def test_the_authors_forms_probe_truncate_and_reload_at_a_depth(form):
    model, _ = authors_model(form)
    t = tokens()
    probed = model.probe(t)
    torch.testing.assert_close(probed[-1], model(t), rtol=1e-12, atol=1e-12)
    for k in range(model.depth + 1):
        torch.testing.assert_close(model.truncate(k)(t), probed[k], rtol=1e-12, atol=1e-12)
    built = GPT(VOCAB, MAX_LEN, 32, 2, 4, backend="reference", **AUTHORS, **FORMS[form]).double()
    built.load_state_dict(model.truncate(2).state_dict())
    torch.testing.assert_close(built(t), probed[2], rtol=1e-12, atol=1e-12)


def test_skip_attention_needs_the_hybrid_and_a_decoder():
    with pytest.raises(ValueError, match=r"skip_attention needs the hybrid .* got connectivity='acn'"):
        GPT(VOCAB, MAX_LEN, 32, 2, 4, skip_attention=True)
    from acn_kernels.long_connections import LongConnections
    with pytest.raises(ValueError, match=r"skip_attention needs blocks of several units .* got units_per_block=1"):
        LongConnections([torch.nn.Linear(4, 4)] * 2, gates="learned", skip_attention=True)
