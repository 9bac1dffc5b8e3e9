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
