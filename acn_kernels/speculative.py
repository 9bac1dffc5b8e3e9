"""Self-speculative decoding: an ACN language model's first k blocks draft, the whole model verifies.

An ACN's running sum after k blocks is read by the same final norm and head as the whole sum, and
its first k blocks compute the same activations whether the rest runs or not (each block reads only
the chain below it; the hybrid's short path too). So the first k depths are a draft model that costs
k/L of a forward and whose keys and values the full model reuses. Each round:

    draft   the first k depths, one position at a time, `draft_tokens` times: a token from their
            readout, its keys and values in the first k layers' cache, its state at depth k kept
            (and the last draft's state too, without the head, where the round may commit one more)
    verify  depths k+1..L over the drafted positions at once, from those states: the full model's
            logits at every drafted position and after the last draft (one pass of the full depth)
    accept  greedy: the drafts up to the first one the full model would not have chosen, then the
            full model's own token there, or after the last draft when every draft was accepted (the
            "bonus" token); sampling: the speculative sampling rule (a draft d accepted with
            probability min(1, p(d) / q(d)), the first rejected one replaced by a sample of
            max(0, p - q), normalized; the bonus token a sample of p), so the tokens are distributed
            as the full model's
    cut     every layer's cache back to the accepted positions

A batch commits, each round, as many tokens as its least accepting unfinished sequence (each
sequence's tokens are its own). With eos_token_id a sequence ends at that token, pad_token_id after
it, and the generation stops once every sequence has ended, as `generate` stops. Greedy tokens are
the plain cached `generate`'s, up to the rounding of running the verified positions as one batch. A
model offers `speculator(draft_depth, input_ids, max_new_tokens, attention_mask)`: an object with
prefill, draft (with readout=False: the state alone), verify and crop (the package's GPT:
`GPTSpeculator` in models/gpt.py; an acnify'd Hugging Face causal LM: `DecoderSpeculator` in
convert/decoder.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ._validation import check_positive_int, check_real


@dataclass
class SpeculativeStats:
    """What a speculative generation did: tokens per sequence, drafts made and accepted (over the
    batch), passes of the full depth (the prompt's included) and the seconds it took."""
    batch: int
    new_tokens: int
    drafted: int
    accepted: int
    full_passes: int
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.batch * self.new_tokens / self.seconds

    def __str__(self) -> str:
        return (f"{self.new_tokens} tokens x {self.batch}: {self.accepted} of {self.drafted} drafts accepted "
                f"({100 * self.acceptance_rate:.1f}%), {self.full_passes} passes of the full depth, "
                f"{self.tokens_per_second:.1f} tokens/s")


def distribution(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """softmax(logits / temperature) over the top_k tokens (all of them without top_k), in float32."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, -1)


def choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """(batch, 1) tokens from (batch, vocab) logits: the most likely, or a sample."""
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(distribution(logits, temperature, top_k), 1, generator=generator)


def check_sampling(temperature, top_k) -> None:
    check_real("temperature", temperature, "a positive number", minimum=0)
    if temperature == 0:
        raise ValueError("temperature must be a positive number, got 0 (use do_sample=False for greedy)")
    if top_k is not None:
        check_positive_int("top_k", top_k)


def speculative_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, draft_depth: int,
                         draft_tokens: int = 4, do_sample: bool = False, temperature: float = 1.0,
                         top_k: int | None = None, attention_mask: torch.Tensor | None = None,
                         generator: torch.Generator | None = None, eos_token_id=None,
                         pad_token_id: int | None = None) -> tuple:
    """(tokens, SpeculativeStats): input_ids (batch, positions) followed by up to max_new_tokens
    tokens, drafted by the model's first `draft_depth` blocks, `draft_tokens` at a time, and verified
    by the whole model (see the module docstring). eos_token_id (an id or a list of them) ends a
    sequence, pad_token_id (default: the first end-of-sequence id) fills it after, as `generate` does
    (a Hugging Face model's own: model.generation_config.eos_token_id). A model without a speculator
    is refused."""
    speculator = getattr(model, "speculator", None)
    if not callable(speculator):
        raise TypeError(f"model must be an ACN-style language model with speculator() (the package's GPT, every "
                        f"connectivity, or an acnify'd Hugging Face causal LM), got {type(model).__name__}")
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("draft_tokens", draft_tokens)
    check_sampling(temperature, top_k)
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must hold at least one sequence (batch, positions), got shape "
                         f"{tuple(input_ids.shape)}")
    stop = Stop.of(eos_token_id, pad_token_id)
    drafter = speculator(draft_depth, input_ids, max_new_tokens, attention_mask)
    with torch.no_grad():
        return speculate(drafter, input_ids, max_new_tokens, draft_tokens, do_sample, temperature, top_k, generator,
                         stop)


class Stop:
    """End-of-sequence handling, as `generate` does it: a sequence ends at any of `eos` (ids), every
    token after it is `pad`, and the generation stops once every sequence has ended."""

    def __init__(self, eos: tuple, pad: int):
        self.eos, self.pad = eos, pad

    @classmethod
    def of(cls, eos_token_id, pad_token_id) -> "Stop | None":
        """None without eos_token_id; else the ids checked (pad_token_id defaults to the first)."""
        if eos_token_id is None:
            if pad_token_id is not None:
                raise ValueError(f"pad_token_id needs eos_token_id (it fills a sequence after its end), got "
                                 f"pad_token_id={pad_token_id!r} and eos_token_id=None")
            return None
        eos = tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (eos_token_id,)
        for name, value in [*(("eos_token_id", e) for e in eos), ("pad_token_id", pad_token_id)]:
            if value is not None:
                check_positive_int(name, value, minimum=0)
        if not eos:
            raise ValueError("eos_token_id must be a token id or a non-empty list of them, got []")
        return cls(eos, eos[0] if pad_token_id is None else pad_token_id)

    def ends(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.isin(tokens, torch.tensor(self.eos, device=tokens.device))

    def apply(self, new: torch.Tensor, ended: torch.Tensor) -> tuple:
        """(new (batch, m) with the tokens after each sequence's end padded, which sequences have ended
        since, the tokens the generation keeps: all m, or up to the last sequence's end once all ended)."""
        end = self.ends(new).int()
        after_end = ended[:, None] | ((end.cumsum(1) - end) > 0)
        new = new.masked_fill(after_end, self.pad)
        ended = ended | end.bool().any(1)
        keep = new.shape[1]
        if bool(ended.all()):  # generate stops at the last sequence's end
            keep = int((~after_end).int().sum(1).max())
        return new, ended, keep


def check_draft_depth(draft_depth, depth: int) -> None:
    """What a speculator checks first: a draft of 1..L-1 depths of a model of L."""
    if isinstance(draft_depth, bool) or not isinstance(draft_depth, int) or not 1 <= draft_depth < depth:
        raise ValueError(f"draft_depth must be an integer in [1, {depth - 1}] (fewer depths than the model's "
                         f"{depth}), got {draft_depth!r}")


def speculate(drafter, prompt: torch.Tensor, max_new_tokens: int, draft_tokens: int, do_sample: bool,
              temperature: float, top_k: int | None, generator: torch.Generator | None, stop: Stop | None = None) -> tuple:
    synchronize(prompt.device)
    began = time.perf_counter()
    first = choose(drafter.prefill(prompt), do_sample, temperature, top_k, generator)
    ended = torch.zeros(len(prompt), dtype=torch.bool, device=prompt.device)
    if stop is not None:
        first, ended, _ = stop.apply(first, ended)
    tokens = torch.cat([prompt, first], 1)
    stats = SpeculativeStats(prompt.shape[0], 1, 0, 0, 1, 0.0)
    while stats.new_tokens < max_new_tokens and not bool(ended.all()):
        remaining = max_new_tokens - stats.new_tokens
        count = min(draft_tokens, remaining)
        position = tokens.shape[1] - 1  # the last token: chosen, not yet run by any layer
        current, states, drafts, draft_logits = tokens[:, -1:], [], [], []
        for i in range(count):
            logits, state = drafter.draft(current, position + i)
            current = choose(logits, do_sample, temperature, top_k, generator)
            states.append(state)
            drafts.append(current)
            draft_logits.append(logits)
        if count < remaining:  # the last draft's state: the full model's token after it, if all are accepted
            states.append(drafter.draft(current, position + count, readout=False)[1])
        full = drafter.verify(states, position)  # (batch, count (+ 1), vocab): the full model's logits there
        drafts = torch.cat(drafts, 1)
        if do_sample:
            committed, accepted = accept_sampled(full, torch.stack(draft_logits, 1), drafts, ~ended, temperature,
                                                 top_k, generator)
        else:
            committed, accepted = accept_greedy(full, drafts, ~ended)
        keep = committed.shape[1]
        if stop is not None:
            committed, ended, keep = stop.apply(committed, ended)
        tokens = torch.cat([tokens, committed[:, :keep]], 1)
        drafter.crop(position + committed.shape[1])
        stats.new_tokens += keep
        stats.drafted += drafts.numel()
        stats.accepted += accepted
        stats.full_passes += 1
    synchronize(prompt.device)
    stats.seconds = time.perf_counter() - began
    return tokens, stats


def committed_length(accepted: torch.Tensor, verified: int, counted: torch.Tensor) -> int:
    """Tokens the batch commits this round, of the `verified` positions: its least accepting counted
    (unfinished) sequence's drafts and the full model's token after them."""
    least = accepted[counted].min() if bool(counted.any()) else accepted.min()
    return min(int(least) + 1, verified)


def accept_greedy(full: torch.Tensor, drafts: torch.Tensor, counted: torch.Tensor) -> tuple:
    """(committed tokens (batch, m), accepted drafts among them over the batch): the full model's own
    choices, which equal the drafts up to the first that differs (full may hold one more position than
    the drafts: the bonus token after them)."""
    chosen = full.argmax(-1)
    accepted = (chosen[:, :drafts.shape[1]] == drafts).int().cumprod(1).sum(1)
    m = committed_length(accepted, full.shape[1], counted)
    return chosen[:, :m], int(accepted.clamp(max=m).sum())


def accept_sampled(full: torch.Tensor, draft_logits: torch.Tensor, drafts: torch.Tensor, counted: torch.Tensor,
                   temperature: float, top_k: int | None, generator: torch.Generator | None) -> tuple:
    """The speculative sampling rule per sequence: the drafts each kept with probability
    min(1, p(d) / q(d)), up to the first rejected one, which is resampled from max(0, p - q); when the
    batch accepted every draft, the bonus token is a sample of p after the last draft."""
    n = drafts.shape[1]
    p, q = distribution(full, temperature, top_k), distribution(draft_logits, temperature, top_k)
    p_draft, q_draft = p[:, :n].gather(-1, drafts[..., None])[..., 0], q.gather(-1, drafts[..., None])[..., 0]
    uniform = torch.rand(drafts.shape, device=drafts.device, generator=generator)
    accepted = (uniform * q_draft < p_draft).int().cumprod(1).sum(1)
    m = committed_length(accepted, full.shape[1], counted)
    if m > n:  # every counted sequence accepted every draft
        bonus = torch.multinomial(p[:, n], 1, generator=generator)
        return torch.cat([drafts, bonus], 1), int(accepted.sum())
    committed = drafts[:, :m].clone()
    for b in torch.nonzero(accepted < m).flatten().tolist():  # rejected at position m - 1: resample it
        residual = (p[b, m - 1] - q[b, m - 1]).clamp(min=0)
        residual = residual if residual.sum() > 0 else p[b, m - 1]
        committed[b, m - 1] = torch.multinomial(residual / residual.sum(), 1, generator=generator)[0]
    return committed, int(accepted.clamp(max=m).sum())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
