"""Self-speculative decoding (acn_kernels/speculative.py): greedy tokens equal the plain cached generate's
for every connectivity, draft depth and length, batch and dtype, with and without rejections; the
sampled tokens follow the full model's distribution within a statistical bound; the statistics add
up; bad arguments are named."""
import itertools

import pytest
import torch

from acn_kernels import GPT, MLP, speculative_generate
from sampling_checks import assert_pair_frequencies, exact_pairs

VOCAB, MAX_LEN = 37, 48
FORMS = {"acn": dict(connectivity="acn"), "hybrid": dict(connectivity="hybrid", gate_init=0.3),
         "h-acn": dict(connectivity="hybrid", gate_scope="block", gate_init=0.2, bias=False),
         "long-short": dict(connectivity="hybrid", gate_scope="block", long_weights=True, x0_weight=True,
                            gates_from_long_weights=True, long_weight_init=0.8),
         "residual": dict(connectivity="residual"), "ffn": dict(connectivity="ffn")}


def model_of(form: str, dtype=torch.float64, depth: int = 4, vocab: int = VOCAB, sharpen: float = 1.0, **options):
    """A small GPT; sharpen > 1 scales its blocks' output projections, so that its shallow readouts
    disagree with the full model more often (rejected drafts)."""
    torch.manual_seed(0)
    model = GPT(vocab, MAX_LEN, 32, depth, 4, backend="reference", **FORMS[form], **options).to(dtype).eval()
    with torch.no_grad():
        for block in model.blocks:
            for weight in block.output_projections():
                weight.mul_(sharpen)
    return model


def prompts(batch: int = 3, positions: int = 5, vocab: int = VOCAB):
    return torch.randint(0, vocab, (batch, positions), generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_greedy_speculative_tokens_are_the_plain_generates_at_every_draft_depth_and_length(form, dtype):
    options = dict(positions="rotary", norm="rmsnorm", mlp="swiglu") if form in ("acn", "residual") else {}
    model = model_of(form, dtype, sharpen=8.0, **options)
    for batch in (1, 3):
        prompt = prompts(batch)
        plain = model.generate(prompt, 17)
        for depth, length in itertools.product((1, 2, 3), (1, 3, 6)):
            tokens, stats = speculative_generate(model, prompt, 17, draft_depth=depth, draft_tokens=length)
            assert torch.equal(tokens, plain), (batch, depth, length)
            assert stats.new_tokens == 17 and stats.batch == batch and 0 <= stats.accepted <= stats.drafted
            assert stats.full_passes >= 1 + -(-16 // (length + 1))  # a pass per round (its drafts and the bonus)
        assert torch.equal(model.generate(prompt, 17, draft_depth=2, draft_tokens=3), plain)


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_round_whose_drafts_are_all_accepted_commits_the_full_models_next_token_too(do_sample):
    """The verify pass's logits after the last draft give one more token (the "bonus"): a draft that is
    the full model (its last block writes nothing) commits draft_tokens + 1 tokens a round."""
    model = model_of("acn", depth=3)
    with torch.no_grad():
        for weight in model.blocks[-1].output_projections():
            weight.zero_()
        for bias in (model.blocks[-1].attn.proj.bias, model.blocks[-1].mlp[2].bias):
            bias.zero_()
    prompt = prompts(2)
    options = dict(do_sample=do_sample, generator=torch.Generator().manual_seed(0))
    tokens, stats = speculative_generate(model, prompt, 13, draft_depth=2, draft_tokens=3, **options)
    assert stats.accepted == stats.drafted == 2 * 9  # rounds of 3 drafts + 1 bonus: 1 + 4 + 4 + 4 tokens
    assert stats.full_passes == 1 + 3 and stats.new_tokens == 13 and tokens.shape == (2, 5 + 13)
    if not do_sample:
        assert torch.equal(tokens, model.generate(prompt, 13))


@pytest.mark.parametrize("form", ["acn", "long-short"])
def test_an_end_of_sequence_token_stops_speculation_as_it_stops_generate(form):
    """eos_token_id: each sequence padded after its end, the generation over once all have ended (its
    length then the last end's), token for token generate's with the same stopping."""
    model = model_of(form, sharpen=8.0)
    prompt = prompts(3)
    free = model.generate(prompt, 20)
    for eos in (int(free[0, 9]), [int(free[1, 12]), int(free[2, 7])], [int(t) for t in free[:, 8]]):
        plain = model.generate(prompt, 20, eos_token_id=eos, pad_token_id=VOCAB - 1)
        assert plain.shape[1] <= 25 and (isinstance(eos, list) or bool((plain[0, 10:] == VOCAB - 1).all()))
        for depth, length in ((1, 2), (2, 4), (3, 1)):
            tokens, stats = speculative_generate(model, prompt, 20, draft_depth=depth, draft_tokens=length,
                                                 eos_token_id=eos, pad_token_id=VOCAB - 1)
            assert torch.equal(tokens, plain), (eos, depth, length)
            assert stats.new_tokens == plain.shape[1] - 5
    ended = model.generate(prompt, 20, eos_token_id=[int(t) for t in free[:, 8]])
    assert ended.shape[1] <= 9  # every row ended by position 8: generation stopped there
    assert torch.equal(model.generate(prompt, 20, draft_depth=2, eos_token_id=[int(t) for t in free[:, 8]]), ended)


def test_rejected_drafts_are_cut_from_every_cache():
    model = model_of("acn", sharpen=8.0)
    prompt = prompts(3)
    tokens, stats = speculative_generate(model, prompt, 30, draft_depth=1, draft_tokens=5)
    assert stats.accepted < stats.drafted  # rejections happened, and the tokens still agree
    assert torch.equal(tokens, model.generate(prompt, 30))
    assert stats.full_passes - 1 < 29  # and fewer passes of the full depth than tokens after the first


@pytest.mark.parametrize("form", ["acn", "hybrid"])
@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 3)])
def test_sampled_tokens_follow_the_full_models_distribution(form, temperature, top_k):
    model = model_of(form, vocab=5, depth=3, sharpen=4.0)
    prompt = prompts(1, 4, vocab=5)
    samples = 6000
    tokens, stats = speculative_generate(model, prompt.expand(samples, -1), 2, draft_depth=1, draft_tokens=2,
                                         do_sample=True, temperature=temperature, top_k=top_k,
                                         generator=torch.Generator().manual_seed(0))
    assert 0 < stats.accepted < stats.drafted  # both branches of the rule ran
    assert_pair_frequencies(tokens, exact_pairs(lambda t: model(t)[:, -1], prompt, temperature, top_k))


def test_bad_arguments_are_named():
    model = model_of("acn")
    prompt = prompts(2)
    for depth in (0, 4, True, 2.5):
        with pytest.raises(ValueError, match=rf"draft_depth must be an integer in \[1, 3\] .*, got {depth!r}"):
            speculative_generate(model, prompt, 3, draft_depth=depth)
    with pytest.raises(ValueError, match=r"draft_tokens must be an integer >= 1, got 0"):
        speculative_generate(model, prompt, 3, draft_depth=1, draft_tokens=0)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 1, got 0"):
        speculative_generate(model, prompt, 0, draft_depth=1)
    with pytest.raises(ValueError, match=r"max_new_tokens must leave the sequence within max_len=48"):
        speculative_generate(model, prompt, 44, draft_depth=1)
    with pytest.raises(ValueError, match=r"attention_mask must be None or all ones .*, got zeros"):
        speculative_generate(model, prompt, 3, draft_depth=1, attention_mask=torch.tensor([[0, 1, 1, 1, 1]] * 2))
    with pytest.raises(TypeError, match=r"model must be an ACN-style language model with speculator\(\) .*, got MLP"):
        speculative_generate(MLP(4, 8, 2, 3), prompt, 3, draft_depth=1)
    with pytest.raises(ValueError, match=r"temperature must be a positive number, got 0"):
        speculative_generate(model, prompt, 3, draft_depth=1, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match=r"pad_token_id needs eos_token_id .*, got pad_token_id=3 and eos_token_id=None"):
        speculative_generate(model, prompt, 3, draft_depth=1, pad_token_id=3)
    for bad in (-1, [2, "x"], []):
        with pytest.raises(ValueError, match=r"eos_token_id must be"):
            speculative_generate(model, prompt, 3, draft_depth=1, eos_token_id=bad)


def test_compress_reports_the_fastest_lossless_draft_depth_and_length():
    from acn_kernels import compress
    from acn_kernels.depth import DRAFT_LENGTHS

    model = model_of("acn", torch.float32)
    ids = prompts(4, 12)
    report = compress(model, ids, ids, metric="loss", tolerance=50.0, repeats=1, timing_batch=4,
                      generate_tokens=6)
    speculation = report.speculation
    assert 1 <= speculation.draft_depth < model.depth and speculation.draft_tokens in DRAFT_LENGTHS
    assert speculation.tokens_per_second > 0 and 0.0 <= speculation.acceptance_rate <= 1.0
    assert "lossless: speculative decoding, draft depth" in str(report)
    assert compress(model, ids, ids, metric="loss", repeats=1, timing_batch=4).speculation is None


def test_an_empty_batch_is_refused_by_name():
    model = GPT(40, 24, 16, 3, 2, backend="reference")
    with pytest.raises(ValueError, match=r"input_ids must hold at least one sequence \(batch, positions\), got "
                                         r"shape \(0, 4\)"):
        speculative_generate(model, torch.zeros(0, 4, dtype=torch.long), 4, draft_depth=1)
