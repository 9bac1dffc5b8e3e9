"""Training an ACN language model fast: the early-exit loss, for the package's GPT and acnify'd
Hugging Face causal LMs alike, through the interface both offer: `exit_states(input_ids, **inputs)`
gives the states after 0..L depths (L+1, batch, positions, D), the running sums y_k of an ACN, and
their Readout (the final norm and head, long_connections.Readout).

early_exit_loss reads depths 1..L (the embeddings alone, depth 0, are no exit) through the shared
final norm and head with `depth_cross_entropy`, so no (exits, tokens, vocabulary) logits exist:

- weights "authors": exit k (1..L) weighted 2k / (L (L + 1)) (their `--ee_training`); "uniform": 1/L
  each; or a tensor of L weights;
- curriculum (LayerSkip's, arXiv 2404.16710): None, every exit each step; "rotational", at step t the
  exits k with k = t (mod ROTATION) and the final one; "gradual", the exits from the final one down,
  one more each total_steps / L steps. The final depth is always in, and the weights of the exits in
  are renormalized to sum to one (the final depth's share is at least its own weight).
"""
from __future__ import annotations

import torch

from ._validation import check_choice, check_positive_int

WEIGHTS = ("authors", "uniform")
CURRICULA = ("rotational", "gradual")
ROTATION = 4  # LayerSkip's rotational curriculum: every 4th exit a step, in turn


def exit_weights(depth: int, weights) -> torch.Tensor:
    """The weights of exits 1..L (float32, (L,))."""
    if isinstance(weights, torch.Tensor):
        if tuple(weights.shape) != (depth,) or not weights.is_floating_point():
            raise ValueError(f"weights must be 'authors', 'uniform' or a floating-point tensor of shape ({depth},) "
                             f"(exits 1..L), got {weights.dtype} of shape {tuple(weights.shape)}")
        return weights.detach().float()
    check_choice("weights", weights, WEIGHTS)
    depths = torch.arange(1, depth + 1, dtype=torch.float32)
    return 2 * depths / (depth * (depth + 1)) if weights == "authors" else torch.full((depth,), 1.0 / depth)


def exits_in(depth: int, curriculum: str | None, step: int | None, total_steps: int | None) -> list:
    """The exits (1..L) this step trains, the final one always among them."""
    if curriculum is None:
        return list(range(1, depth + 1))
    check_choice("curriculum", curriculum, CURRICULA)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0 with a curriculum, got {step!r}")
    if curriculum == "rotational":
        chosen = [k for k in range(1, depth) if k % ROTATION == step % ROTATION]
    else:
        check_positive_int("total_steps", total_steps)
        enabled = min(depth, 1 + step * depth // total_steps)  # the final exit, then one more each L-th of training
        chosen = list(range(depth - enabled + 1, depth))
    return [*chosen, depth]


def early_exit_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, *, weights="authors",
                    curriculum: str | None = None, step: int | None = None, total_steps: int | None = None,
                    **inputs) -> torch.Tensor:
    """The weighted next-token loss of the exits at depths 1..L (see the module docstring). labels
    follow Hugging Face's convention: the input ids (-100 where nothing counts), shifted inside,
    as model(labels=) does. `inputs` reach the model's forward (an attention_mask)."""
    if not callable(getattr(model, "exit_states", None)):
        raise TypeError(f"model must offer exit_states() (the package's GPT, an acnify'd Hugging Face causal LM), "
                        f"got {type(model).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        raise ValueError(f"labels must be a tensor of input_ids' shape {tuple(input_ids.shape)} (the input ids, "
                         f"shifted inside), got {getattr(labels, 'shape', type(labels).__name__)}")
    states, readout = model.exit_states(input_ids, **inputs)
    depth = states.shape[0] - 1
    all_weights = exit_weights(depth, weights)
    chosen = exits_in(depth, curriculum, step, total_steps)
    chosen_weights = all_weights[[k - 1 for k in chosen]]
    chosen_weights = (chosen_weights / chosen_weights.sum().clamp(min=1e-12)).to(states.device)
    return readout.losses(states[chosen], labels, chosen_weights)[0]
