"""`bench --suite speculative`: lossless self-speculative decoding, measured on trained models.

1. Table 6's addition twins (acn, hybrid, residual; seed 0, the authors' recipe, loaded from
   `paper --lm-models DIR` or trained here): every draft depth and length against the plain cached
   generate, measured in the same run.
2. A byte-level ACN of the size a user trains first (the corpus of table 6; dim 128, 8 blocks, 400
   steps; Llama-style: RMSNorm, SwiGLU, rotary, no biases): the same sweep, over the 8 prompts as one
   batch (each round commits what the least accepting sequence accepted) and a prompt at a time.
3. That model as an `acnify`'d Hugging Face Llama (its weights copied, the same logits): transformers'
   own early-exit drafting, `generate(assistant_early_exit=k)` (a batch of one, as transformers runs
   it), beside `speculative_generate` at the same draft depth and length. Both draft with the first k
   layers and keep the same tokens; transformers' assistant keeps a cache of its own, so its verify
   pass runs all L layers over the drafts again, where the package's runs only the L - k after the
   draft's (the draft's keys and values are the full model's): the ratio of the two is what sharing
   the draft's cache is worth. Needs the [hf] extra; without it this part says so and is left out.

Every row's tokens are checked against the plain generate's (depth.speculations, and here for part 3).
All on one CPU thread (experiments/lm/train.deterministic). `--quick` is a smoke run of the harness: models trained
for seconds, so it says so and draws no verdict.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import statistics

import torch

from ..depth import generation_tokens_per_second, median_ms, speculations
from ..experiments import text
from ..experiments.lm.rows import PROMPT, RECIPES, ROWS, LanguageSettings
from ..experiments.lm.tasks import task_of
from ..experiments.lm.train import deterministic, loaded_or_trained, saved_model_path, train
from ..experiments.report import print_table, write_csv
from ..models import GPT
from ..speculative import speculative_generate

SPECULATIVE_TWINS = ("acn", "hybrid", "residual")
COLUMNS = ("accepted %", "tokens/s", "plain tokens/s", "speedup")
HF_COLUMNS = ("accepted %", "transformers tokens/s", "package tokens/s", "plain tokens/s", "transformers speedup",
              "package speedup", "shared cache worth")
USER_MODEL = dict(dim=128, depth=8, steps=400)  # the byte-level GPT a new user trained first
HF_DRAFT_TOKENS = 4


def user_settings(settings: LanguageSettings) -> LanguageSettings:
    """Part 2's model: `settings` at USER_MODEL's width, depth and corpus steps."""
    return dataclasses.replace(settings, dim=USER_MODEL["dim"], depth=USER_MODEL["depth"],
                               steps={**settings.steps, "corpus": USER_MODEL["steps"]})


def speculative_bench(settings: LanguageSettings, out: str, models_dir: str | None, tqdm, quick: bool = False,
                      user: LanguageSettings | None = None) -> dict:
    """The three parts of the module docstring (part 2's model trained with `user`, default `settings`);
    prints their tables (and, unless quick, the acceptance comparison of part 1), writes
    speculative.csv; returns the rows."""
    for twin in SPECULATIVE_TWINS if models_dir is not None else ():
        saved_model_path(models_dir, "addition", twin, 0)  # all there before any of them runs
    smoke = ("SMOKE RUN of the harness (--quick: models trained for seconds, so their acceptance and speed say "
             "nothing about an ACN; no verdicts): " if quick else "")
    rows, records = {}, []
    task = task_of(settings, "addition")
    prompts = task.validation[0][:8, :PROMPT]
    for twin in tqdm(SPECULATIVE_TWINS, desc="bench speculative", unit="model"):
        model = loaded_or_trained(settings, "addition", twin, 0, models_dir).eval()
        sweep(f"{twin} draft", model, prompts, settings.new_tokens, rows, records, twin)
    print_table(f"{smoke}Self-speculative decoding of table 6's addition GPTs ({settings.depth} blocks of dim "
                f"{settings.dim}, seed 0, {'loaded from ' + models_dir if models_dir else 'trained here'}): greedy, KV "
                f"caches, {len(prompts)} prompts x {settings.new_tokens} tokens, one CPU thread; every row's tokens equal "
                "the plain cached generate's (checked); speedup over the plain generate measured in this run",
                list(COLUMNS), rows, digits=2)
    if not quick:
        print(acceptance_comparison(rows, settings.depth))
    user = user or settings
    lm, user_prompts = user_model(user)
    for batch, one_at_a_time in ((len(user_prompts), False), (1, True)):
        user_rows: dict = {}
        sweep(f"corpus acn b{batch} draft", lm, user_prompts, settings.new_tokens, user_rows, records, "corpus acn",
              one_at_a_time)
        print_table(f"{smoke}Self-speculative decoding of a byte-level ACN (the corpus, {user.depth} blocks of dim "
                    f"{user.dim}, {user.steps['corpus']} steps of {user.batch}, Llama-style; seed 0): greedy, "
                    f"{len(user_prompts)} prompts x {settings.new_tokens} tokens "
                    f"{'a prompt at a time' if one_at_a_time else 'as one batch'}, one CPU thread, tokens checked",
                    list(COLUMNS), user_rows, digits=2)
        best = max(user_rows.items(), key=lambda item: item[1]["speedup"][0])
        print(f"fastest: {best[0]}: {best[1]['speedup'][0]:.2f}x the plain generate's tokens/s, "
              f"{best[1]['accepted %'][0]:.0f}% of the drafts accepted, every token the plain generate's")
        rows.update(user_rows)
    if importlib.util.find_spec("transformers") is None:
        print("part 3 (transformers' assistant_early_exit beside speculative_generate) needs the [hf] extra: "
              "pip install 'acn-kernels[hf]'; left out of this run")
    else:
        hf_rows = transformers_comparison(lm, user_prompts[:4], settings.new_tokens, records)
        print_table(f"{smoke}The same ACN as an acnify'd Hugging Face Llama, a prompt at a time, "
                    f"{HF_DRAFT_TOKENS} drafts a round: transformers' generate(assistant_early_exit=k) (its assistant "
                    "keeps its own cache; the verify pass runs every layer) against speculative_generate (the verify "
                    "pass runs the layers after the draft's, on the draft's cache); tokens checked",
                    list(HF_COLUMNS), hf_rows, digits=2)
        rows.update(hf_rows)
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "speculative.csv"), records)
    return rows


def sweep(prefix: str, model: GPT, prompts: torch.Tensor, new_tokens: int, rows: dict, records: list,
          name: str, one_at_a_time: bool = False) -> None:
    """Every draft depth and length of `model` (depth.speculations, tokens checked) against its plain
    generate in the same run, over the prompts as one batch, or one at a time (a batch commits what its
    least accepting sequence accepts): a row each in rows and records (model=name). Tokens/s are the
    tokens over the summed time, acceptance the mean over the batches."""
    batches = [prompt[None] for prompt in prompts] if one_at_a_time else [prompts]
    plain_seconds, seconds, accepted = 0.0, {}, {}
    with deterministic():
        for batch in batches:
            tokens = batch.shape[0] * new_tokens
            plain_seconds += tokens / generation_tokens_per_second(model, batch, new_tokens)
            for s in speculations(model, batch, new_tokens):
                key = (s.draft_depth, s.draft_tokens)
                seconds[key] = seconds.get(key, 0.0) + tokens / s.tokens_per_second
                accepted.setdefault(key, []).append(s.acceptance_rate)
    total = len(prompts) * new_tokens
    plain = total / plain_seconds
    for (depth, length), spent in seconds.items():
        values = {"accepted %": 100 * statistics.fmean(accepted[depth, length]), "tokens/s": total / spent,
                  "plain tokens/s": plain, "speedup": total / spent / plain}
        rows[f"{prefix} {depth} x{length}"] = {c: [v] for c, v in values.items()}
        records.append(dict(model=name, batch=1 if one_at_a_time else len(prompts), draft_depth=depth,
                            draft_tokens=length, new_tokens=new_tokens, prompts=len(prompts), tokens_identical=True,
                            **values))


def acceptance_comparison(rows: dict, depth: int) -> str:
    """At how many draft depths the acn's acceptance (mean over the draft lengths) beats the residual's."""
    def mean_accepted(twin, k):
        return statistics.fmean(v["accepted %"][0] for key, v in rows.items() if key.startswith(f"{twin} draft {k} "))
    higher = [k for k in range(1, depth) if mean_accepted("acn", k) > mean_accepted("residual", k)]
    pairs = ", ".join(f"k={k} {mean_accepted('acn', k):.0f}% vs {mean_accepted('residual', k):.0f}%"
                      for k in range(1, depth))
    return (f"the acn's shallow depths draft with a higher acceptance than the residual twin's at {len(higher)} of "
            f"{depth - 1} draft depths (acn vs residual, mean over the draft lengths: {pairs})")


def user_model(settings: LanguageSettings) -> tuple:
    """(the byte-level Llama-style ACN trained on the corpus with the authors' recipe, 8 held-out prompts)."""
    task = task_of(settings, "corpus")
    with deterministic():
        torch.manual_seed(0)
        model = GPT(text.VOCAB, max(task.max_len, PROMPT + settings.new_tokens), settings.dim, settings.depth,
                    settings.heads, backend=settings.backend, **{**RECIPES["authors"].model, "norm": "rmsnorm",
                                                                "mlp": "swiglu"})
        train(model, task, settings, 0, ROWS["acn"], settings.steps["corpus"])
    return model.eval(), task.validation[0][:8, :PROMPT]


def as_hf_llama(model: GPT) -> torch.nn.Module:
    """The package's Llama-style ACN GPT (rmsnorm, swiglu, rotary, no biases, tied head) as an acnify'd
    transformers LlamaForCausalLM with its weights: the same logits. The GPT rotates (even, odd)
    feature pairs of each head, Llama (i, i + head_dim / 2): the query and key rows are permuted to match."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..convert import acnify

    dim, heads, hidden = model.token_embed.embedding_dim, model.blocks[0].attn.heads, model.blocks[0].mlp[2].in_features
    head_dim = dim // heads
    config = LlamaConfig(vocab_size=model.vocab_size, hidden_size=dim, intermediate_size=hidden,
                         num_hidden_layers=model.depth, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=model.max_len, rms_norm_eps=model.final_norm.eps,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    lm = LlamaForCausalLM(config).to(model.token_embed.weight.dtype)
    pairs = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    halves = lambda w: w.view(heads, head_dim, dim)[:, pairs].reshape(dim, dim)  # noqa: E731
    with torch.no_grad():
        lm.model.embed_tokens.weight.copy_(model.token_embed.weight)
        lm.model.norm.weight.copy_(model.final_norm.weight)
        for block, layer in zip(model.blocks, lm.model.layers):
            q, k, v = block.attn.qkv_weights()
            attention, mlp = layer.self_attn, layer.mlp
            for target, source in ((layer.input_layernorm.weight, block.norm1.weight),
                                   (layer.post_attention_layernorm.weight, block.norm2.weight),
                                   (attention.q_proj.weight, halves(q)), (attention.k_proj.weight, halves(k)),
                                   (attention.v_proj.weight, v), (attention.o_proj.weight, block.attn.proj.weight),
                                   (mlp.gate_proj.weight, block.mlp[0].weight[:hidden]),
                                   (mlp.up_proj.weight, block.mlp[0].weight[hidden:]),
                                   (mlp.down_proj.weight, block.mlp[2].weight)):
                target.copy_(source)
    return acnify(lm, backend="reference").eval()


def transformers_comparison(model: GPT, prompts: torch.Tensor, new_tokens: int, records: list) -> dict:
    """Per draft depth k: tokens/s of transformers' early-exit generate and of speculative_generate on the
    acnify'd Llama copy of `model`, a prompt at a time, HF_DRAFT_TOKENS drafts a round (transformers'
    schedule held constant, its confidence stop off, so both draft alike), against its plain generate."""
    lm = as_hf_llama(model)
    lm.generation_config.num_assistant_tokens = HF_DRAFT_TOKENS
    lm.generation_config.num_assistant_tokens_schedule = "constant"
    lm.generation_config.assistant_confidence_threshold = 0.0
    rows = {}
    with deterministic():
        plain = tokens_per_second(lambda ids: lm.generate(ids, max_new_tokens=new_tokens, do_sample=False), prompts)
        for k in range(1, model.depth):
            early = tokens_per_second(lambda ids: lm.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                                              assistant_early_exit=k), prompts, plain[1])
            runs = []

            def package_generate(ids, k=k):
                tokens, stats = speculative_generate(lm, ids, new_tokens, draft_depth=k, draft_tokens=HF_DRAFT_TOKENS)
                runs.append(stats)
                return tokens
            package = tokens_per_second(package_generate, prompts, plain[1])
            values = {"accepted %": 100 * sum(r.accepted for r in runs) / sum(r.drafted for r in runs),
                      "transformers tokens/s": early[0], "package tokens/s": package[0], "plain tokens/s": plain[0],
                      "transformers speedup": early[0] / plain[0], "package speedup": package[0] / plain[0],
                      "shared cache worth": package[0] / early[0]}
            rows[f"llama draft {k} x{HF_DRAFT_TOKENS}"] = {c: [v] for c, v in values.items()}
            records.append(dict(model="acnify'd llama", draft_depth=k, draft_tokens=HF_DRAFT_TOKENS,
                                new_tokens=new_tokens, prompts=len(prompts), tokens_identical=True, **values))
    return rows


def tokens_per_second(generate, prompts: torch.Tensor, expected: list | None = None, repeats: int = 3) -> tuple:
    """(new tokens per second of generate over the prompts one at a time (median of `repeats`), the
    tokens), the tokens checked against `expected` where given."""
    tokens = [generate(prompt[None]) for prompt in prompts]
    if expected is not None and not all(torch.equal(a, b) for a, b in zip(tokens, expected)):
        raise AssertionError("speculative tokens differ from the plain generate's")
    ms = median_ms(lambda: [generate(prompt[None]) for prompt in prompts], prompts.device, repeats, 0)
    new = sum(t.shape[1] for t in tokens) - prompts.numel()
    return new / (ms / 1000), tokens
