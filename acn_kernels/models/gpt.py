"""GPT: a decoder-only causal language model with the package's four connectivities.

    x_0       = token embedding (+ a learned position embedding; rotary positions act in attention)
    acn:      a_i = Attn_i(norm1_i(x_{i-1}));  y += a_i;  m_i = MLP_i(norm2_i(a_i));  y += m_i;  x_i = m_i
              (the authors' AC-GPT: both branches of a block add to the running sum, the attention
              output feeds the MLP branch; y starts at x_0)
    hybrid:   the acn's branches with a gated short path between them (LongConnections' gates: one
              per branch boundary, 2L - 1 in all; gate_scope="block": one per block, on both of its
              short paths, the authors' H-ACN; long_weights, x0_weight and gates_from_long_weights
              give their Long_Short, y = b_0 x_0 + sum_i b_{i+1} (a_i + m_i), block i's gate 1 - b_i;
              skip_attention=True their LSN's --skipattn: the attention's short path whole, gate 1,
              only the MLP's gated)
    residual: h = x + Attn(norm1(x)),  x_i = h + MLP(norm2(h))       (a pre-norm GPT)
    ffn:      x_i = MLP(norm2(Attn(norm1(x_{i-1}))))                 (the chain alone)
    logits    = lm_head(final_norm(y))                               (x_L for residual and ffn)

The branches are the units of the long connections (two per block: LongConnections' units_per_block),
so `probe` gives the logits after 0..L blocks, a block's two branches both added, and `truncate(k)`
keeps k blocks. The authors' language models (ACN-NOTES section 2b): bias=False (no bias in any
linear or norm), scaled_output_init=True (both output projections of a block, attention's and the
MLP's, at normal(0, 0.02 / sqrt(2L))), positions="rotary", and for the hybrid gate_scope="block",
gate_init=0.0 and clamp_range=(0, 1) (`clamp_after(optimizer)`). Attention is causal
`F.scaled_dot_product_attention`; `generate` keeps a KV cache (greedy tokens identical without it). On fused backends every boundary is one `accumulate_norm`
(`hybrid_accumulate_norm`; RMSNorm where asked), the MLPs `feed_forward` (gelu, or swiglu with its
(gate, up) rows), the other linears `linear`; the LM head and cross-entropy stay eager.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_bool, check_choice, check_divisible, check_positive_int, check_token_ids
from ..long_connections import Readout, check_threshold
from .base import LONG, DepthModel
from .layers import FeedForward, FusedLinear
from ..speculative import Stop, check_draft_depth, check_sampling, choose, speculative_generate

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rotary")


def make_norm(kind: str, dim: int, bias: bool = True) -> nn.Module:
    return nn.LayerNorm(dim, bias=bias) if kind == "layernorm" else nn.RMSNorm(dim, eps=1e-6)


def default_mlp_dim(dim: int, mlp: str) -> int:
    """4 dim for gelu; about 8/3 dim for swiglu (its two projections keep the parameter count), a
    multiple of 8."""
    return 4 * dim if mlp == "gelu" else -(-8 * dim // 3 // 8) * 8


class KVCache:
    """The keys and values of every attention layer for the positions seen so far: `generate` fills it
    with the prompt, then one position per new token. `length` is the number of positions held."""

    def __init__(self):
        self.keys: dict = {}
        self.values: dict = {}
        self.length = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """(keys, values) of `layer` with the new positions' appended, (batch, heads, positions, head_dim)."""
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], 2), torch.cat([self.values[layer], v], 2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def crop(self, length: int) -> None:
        """Every layer's first `length` positions kept (speculative decoding's rejected drafts dropped)."""
        for store in (self.keys, self.values):
            for layer in store:
                store[layer] = store[layer][:, :, :length]
        self.length = length


class Rotary(nn.Module):
    """Rotary position embedding (RoPE) of the query and key heads, the cos/sin tables up to max_len."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        inverse = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inverse)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, t: torch.Tensor, start: int) -> torch.Tensor:
        """t (batch, heads, positions, head_dim) rotated by the angles of positions start.."""
        cos = self.cos[start:start + t.shape[2]].to(t.dtype)
        sin = self.sin[start:start + t.shape[2]].to(t.dtype)
        even, odd = t[..., 0::2], t[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over (batch, positions, dim); with a KVCache, the new positions
    attend to every cached one and causally among themselves. qkv's rows are head-major (Megatron's
    layout): head h's query, key and value rows together, so that a tensor-parallel split of its rows
    gives each rank whole heads (acn_kernels.parallel); a state_dict saved with the earlier layout
    (every head's queries, then keys, then values: version 1) is reordered as it loads."""

    _version = 2

    def __init__(self, dim: int, heads: int, layer: int, rotary: Rotary | None, bias: bool = True):
        super().__init__()
        check_positive_int("heads", heads)
        check_divisible("dim", dim, "heads", heads)
        self.heads, self.layer, self.head_dim = heads, layer, dim // heads
        self.qkv = FusedLinear(dim, 3 * dim, bias=bias)
        self.proj = FusedLinear(dim, dim, bias=bias)
        object.__setattr__(self, "rotary", rotary)  # shared by every layer, registered once by the model

    def qkv_weights(self) -> tuple:
        """(query, key, value) weights, each (dim, dim) with the heads' rows in order."""
        return tuple(w.flatten(0, 1) for w in self.qkv.weight.unflatten(0, (self.heads, 3, self.head_dim)).unbind(1))

    def head_major(self, rows: torch.Tensor) -> torch.Tensor:
        """qkv's rows (a weight or bias) in the version-1 layout, (3, heads, head_dim, ...), as (heads, 3,
        head_dim, ...)."""
        return rows.unflatten(0, (3, self.heads, -1)).transpose(0, 1).flatten(0, 2)

    @torch.no_grad()
    def initialized_as_version_1(self) -> None:
        """qkv's rows, just initialized, reordered as the version-1 layout held them: a seed gives the
        model it gave before the layout changed."""
        self.qkv.weight.copy_(self.head_major(self.qkv.weight))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version", self._version) < 2:
            for name in ("weight", "bias"):
                if state_dict.get(f"{prefix}qkv.{name}") is not None:
                    state_dict[f"{prefix}qkv.{name}"] = self.head_major(state_dict[f"{prefix}qkv.{name}"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        batch, positions, _ = x.shape
        # -1 heads: a tensor-parallel rank holds its own heads' rows of qkv (and proj's columns)
        q, k, v = self.qkv(x).view(batch, positions, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k, v = cache.extend(self.layer, k, v)
        # branches, not is_causal=positions > 1: under torch.compile that is a symbolic bool, which
        # is_causal does not take
        if positions == 1:  # one new position sees every key
            attended = F.scaled_dot_product_attention(q, k, v)
        elif start == 0:  # the whole prefix is new
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new positions after cached ones: position start + i sees keys 0..start + i
            keys, queries = torch.arange(k.shape[2], device=x.device), torch.arange(positions, device=x.device)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keys <= start + queries[:, None])
        return self.proj(attended.transpose(1, 2).reshape(batch, positions, -1))


class Branch(nn.Module):
    """One branch of a block as a unit of the long connections: it takes the block keywords (cache,
    start) and passes them on only where they mean something (attention)."""

    def __init__(self, module: nn.Module, takes_kwargs: bool):
        super().__init__()
        self.module, self.takes_kwargs = module, takes_kwargs

    def forward(self, h: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.module(h, **kwargs) if self.takes_kwargs else self.module(h)


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, norm: str, mlp: str, layer: int, rotary: Rotary | None,
                 residual: bool, bias: bool = True):
        super().__init__()
        self.norm1 = make_norm(norm, dim, bias)
        self.attn = CausalSelfAttention(dim, heads, layer, rotary, bias)
        self.norm2 = make_norm(norm, dim, bias)
        self.mlp = FeedForward(dim, mlp_dim, "gelu" if mlp == "gelu" else "swiglu", bias)
        self.residual = residual

    def output_projections(self) -> tuple:
        """The weights that write into the residual stream (or the sum): attention's and the MLP's outputs."""
        return self.attn.proj.weight, self.mlp[2].weight

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """The residual block (pre-norm, two skips) or the ffn chain's; the long connections run the
        branches of acn and hybrid blocks themselves."""
        a = self.attn(self.norm1(x), cache=cache, start=start)
        if not self.residual:
            return self.mlp(self.norm2(a))
        h = x + a
        return h + self.mlp(self.norm2(h))


class GPT(DepthModel):
    """A causal language model; see the module docstring. mlp_dim defaults to 4 dim (gelu) or about
    8/3 dim (swiglu). A hybrid takes long_connections.HybridOptions' keywords (gate_scope: "unit", a
    gate per branch boundary, or "block")."""

    units_per_block = 2

    def __init__(self, vocab_size: int, max_len: int, dim: int, depth: int, heads: int, mlp_dim: int | None = None,
                 connectivity: str = "acn", norm: str = "layernorm", mlp: str = "gelu", positions: str = "learned",
                 tie_embeddings: bool = True, backend: str = "auto", bias: bool = True,
                 scaled_output_init: bool = False, **hybrid_options):
        super().__init__(depth, connectivity, backend, **hybrid_options)
        check_bool("bias", bias)
        check_bool("scaled_output_init", scaled_output_init)
        for name, value in (("vocab_size", vocab_size), ("max_len", max_len), ("dim", dim), ("heads", heads)):
            check_positive_int(name, value)
        check_bool("tie_embeddings", tie_embeddings)
        check_choice("norm", norm, NORMS)
        check_choice("mlp", mlp, MLPS)
        check_choice("positions", positions, POSITIONS)
        mlp_dim = default_mlp_dim(dim, mlp) if mlp_dim is None else mlp_dim
        check_positive_int("mlp_dim", mlp_dim)
        check_divisible("dim", dim, "heads", heads)
        if positions == "rotary" and dim // heads % 2:
            raise ValueError(f"dim // heads must be even for rotary positions (they rotate pairs of features), got "
                             f"dim={dim} // heads={heads} = {dim // heads}")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_len, dim) if positions == "learned" else None
        self.rotary = Rotary(dim // heads, max_len) if positions == "rotary" else None
        self.blocks = nn.ModuleList(GPTBlock(dim, heads, mlp_dim, norm, mlp, i, self.rotary,
                                             residual=connectivity == "residual", bias=bias) for i in range(depth))
        self.final_norm = make_norm(norm, dim, bias)
        self.lm_head = FusedLinear(dim, vocab_size, bias=False)
        self.apply(init_weights)
        for block in self.blocks:
            block.attn.initialized_as_version_1()
        if scaled_output_init:  # GPT-2's: each block's two writes into the sum at 0.02 / sqrt(2L)
            for block in self.blocks:
                for weight in block.output_projections():
                    nn.init.normal_(weight, std=0.02 / (2 * depth) ** 0.5)
        if tie_embeddings:
            self.lm_head.weight = self.token_embed.weight
        self.connect()

    def units(self) -> list:
        """Each block's attention branch, then its MLP branch, with their input norms."""
        return [unit for b in self.blocks for unit in ((Branch(b.attn, takes_kwargs=True), b.norm1),
                                                        (Branch(b.mlp, takes_kwargs=False), b.norm2))]

    # ------------------------------------------------------------------ the pieces

    def check_tokens(self, tokens, start: int = 0) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64) \
                or tokens.dim() != 2 or tokens.shape[1] == 0:
            got = f"dtype {tokens.dtype} and shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) \
                else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor of shape (batch, positions >= 1), got {got}")
        if start + tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens must fit max_len={self.max_len} positions, got {tokens.shape[1]}"
                             + (f" after {start} cached ones" if start else ""))
        if torch.compiler.is_compiling():  # a value check would break the graph: checked on the device instead
            torch._assert_async(((tokens >= 0) & (tokens < self.vocab_size)).all(),
                                f"tokens must be in [0, {self.vocab_size}) (vocab_size)")
        else:
            check_token_ids("tokens", tokens, self.vocab_size, "vocab_size")

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        self.check_tokens(tokens, start)
        x = self.token_embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(start, start + tokens.shape[1], device=tokens.device))
        return x

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def states(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0):
        """The residual or ffn chain's state after k = 0..L blocks."""
        x = self.embed(tokens, start)
        yield x
        for i in range(self.depth):
            x = self.run_blocks(i, i + 1, x, cache=cache, start=start)
            yield x

    # ------------------------------------------------------------------ public

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(batch, positions, vocab_size) next-token logits; with a cache, for the new positions after
        the cached ones (the cache then holds them too)."""
        start = cache.length if cache is not None else 0
        if self.connectivity in LONG:
            hidden = self.long_connections(self.embed(tokens, start), cache=cache, start=start)
        else:
            *_, last = self.states(tokens, cache, start)
            hidden = self.final_norm(last)
        if cache is not None:
            cache.length = start + tokens.shape[1]
        return self.readout(hidden)

    def probe(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, output: str = "logits",
              statistics: bool = False):
        """(L+1, batch, positions, vocab_size): the logits after 0..L blocks, through the shared final
        norm and head (a block's two branches both added). output="loss" with labels (Hugging Face's
        convention: the input ids, shifted inside): (L+1,) every depth's mean next-token loss, float32,
        through depth_cross_entropy (no logits kept; for training, acn_kernels.early_exit_loss); with
        statistics=True (losses, ExitStatistics): every depth's accuracy, agreement with the full depth's
        argmax and entropy from the same pass."""
        check_choice("output", output, ("logits", "loss"))
        if output == "loss":
            if labels is None:
                raise ValueError("probe(..., output='loss') needs labels= (the input ids, shifted inside)")
            states, readout = self.exit_states(tokens)
            return readout.depth_losses(states, tokens, labels, statistics)
        if statistics:
            raise ValueError("statistics=True needs output='loss' (the logits are the statistics' source)")
        if self.connectivity not in LONG:
            return torch.stack([self.head(hidden) for hidden in self.states(tokens)])
        return torch.stack([self.readout(hidden) for hidden in self.long_connections.probe(self.embed(tokens))])

    def exit_states(self, tokens: torch.Tensor) -> tuple:
        """(the states after 0..L blocks (L+1, batch, positions, dim), their Readout: the final norm and
        head): what early_exit_loss reads every depth through (acn_kernels.training)."""
        return self.partial_sums(tokens), Readout(self.final_norm, self.lm_head.weight, self.lm_head.bias,
                                                  self.requested_backend)

    def early_exit(self, tokens: torch.Tensor, threshold: float) -> tuple:
        """(logits, depth used), per position: each position's logits from the first depth k whose
        softmax puts at least `threshold` on one token, the full depth otherwise. Every position runs
        every block, since later positions attend to earlier ones at every depth: the depths used
        tell how deep each token needed to go (a decoder that exits early copies the state upward)."""
        check_threshold(threshold)
        logits = self.probe(tokens)
        confident = torch.softmax(logits.float(), -1).amax(-1) >= threshold
        confident[-1] = True
        used = confident.int().argmax(0)
        return logits.gather(0, used[None, ..., None].expand(1, *logits.shape[1:])).squeeze(0), used

    def check_generation(self, tokens: torch.Tensor, max_new_tokens: int) -> None:
        check_positive_int("max_new_tokens", max_new_tokens)
        self.check_tokens(tokens)
        if tokens.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"max_new_tokens must leave the sequence within max_len={self.max_len}, got "
                             f"{max_new_tokens} after {tokens.shape[1]} prompt positions")

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
                 draft_depth: int | None = None, draft_tokens: int = 4, eos_token_id=None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """tokens (batch, positions) followed by up to max_new_tokens generated ones: greedy, or sampled
        from softmax(logits / temperature) restricted to the top_k tokens. With use_cache the prompt
        runs once and each new token alone, its keys and values cached; the greedy tokens are the same.
        eos_token_id (an id or a list) ends a sequence, pad_token_id (default: the first end id) after
        it, and generation stops once every sequence has ended. draft_depth=k decodes speculatively:
        the first k blocks draft draft_tokens at a time and the whole model verifies them
        (speculative_generate, whose statistics it leaves out): the same greedy tokens, faster."""
        if draft_depth is not None:
            return speculative_generate(self, tokens, max_new_tokens, draft_depth=draft_depth,
                                        draft_tokens=draft_tokens, do_sample=do_sample, temperature=temperature,
                                        top_k=top_k, generator=generator, eos_token_id=eos_token_id,
                                        pad_token_id=pad_token_id)[0]
        check_sampling(temperature, top_k)
        self.check_generation(tokens, max_new_tokens)
        stop = Stop.of(eos_token_id, pad_token_id)
        ended = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
        cache = KVCache() if use_cache else None
        logits = self(tokens, cache)[:, -1]
        for step in range(max_new_tokens):
            new = choose(logits, do_sample, temperature, top_k, generator)
            if stop is not None:
                new, ended, _ = stop.apply(new, ended)
            tokens = torch.cat([tokens, new], 1)
            if step + 1 == max_new_tokens or bool(ended.all()):
                break
            logits = (self(new, cache) if use_cache else self(tokens))[:, -1]
        return tokens

    def speculator(self, draft_depth: int, tokens: torch.Tensor, max_new_tokens: int,
                   attention_mask: torch.Tensor | None = None) -> "GPTSpeculator":
        """What speculative_generate drafts and verifies with (speculative.py), for this prompt."""
        check_draft_depth(draft_depth, self.depth)
        self.check_generation(tokens, max_new_tokens)
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ValueError("attention_mask must be None or all ones for the package's GPT, which has no padding "
                             "(every sequence of a batch has the prompt's length), got zeros in it")
        return GPTSpeculator(self, draft_depth)


class GPTSpeculator:
    """A GPT's first k blocks as the draft and blocks k+1..L as the verify pass, one KV cache for all:
    the draft's positions enter the first k layers' cache as it runs, the verify pass the others'."""

    def __init__(self, model: GPT, draft_depth: int):
        self.model, self.k, self.cache = model, draft_depth, KVCache()
        self.long = model.connectivity in LONG
        units = model.units_per_block
        self.draft_units, self.all_units = draft_depth * units, model.depth * units

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """The next-token logits after the prompt, every layer's cache filled with it."""
        return self.model(tokens, self.cache)[:, -1]

    def draft(self, token: torch.Tensor, position: int, readout: bool = True) -> tuple:
        """(the first k blocks' next-token logits, or None without readout, their state at depth k) for
        one position."""
        model, kwargs = self.model, dict(cache=self.cache, start=position)
        x0 = model.embed(token, position)
        if self.long:
            long = model.long_connections
            state = long.run_units(0, self.draft_units, long.start_state(x0), **kwargs)
            hidden = long.sum_and_norm(state[1], None)[1] if readout else None
        else:
            state = model.run_blocks(0, self.k, x0, **kwargs)
            hidden = model.final_norm(state) if readout else None
        return (model.readout(hidden)[:, -1] if readout else None), state

    def verify(self, states: list, position: int) -> torch.Tensor:
        """(batch, positions, vocab): the full model's logits at the drafted positions, from their states."""
        model, kwargs = self.model, dict(cache=self.cache, start=position)
        if self.long:
            long = model.long_connections
            state = tuple(torch.cat(parts, 1) for parts in zip(*states))
            hidden = long.sum_and_norm(long.run_units(self.draft_units, self.all_units, state, **kwargs)[1], None)[1]
        else:
            hidden = model.final_norm(model.run_blocks(self.k, model.depth, torch.cat(states, 1), **kwargs))
        return model.readout(hidden)

    def crop(self, length: int) -> None:
        self.cache.crop(length)


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialization: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
