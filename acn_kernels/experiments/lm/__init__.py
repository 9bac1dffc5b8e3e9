"""The language-model tables of `python -m acn_kernels paper` (6, 6b, 6c): AC-GPT and its twins on offline data.

rows.py holds what runs (the rows, one record each: its GPT, its training method, its tables; the
recipes and settings; the typed key of a run), tasks.py the data sets, train.py the training,
evaluate.py a run's measurements, run.py the runs in order (and in processes), tables.py the printing.

For each data set (the byte-level grammar corpus, n-digit addition with the answer reversed; text.py)
and each twin (acn; the authors' H-ACN hybrid; the package's own hybrid; residual), a GPT trained
with one recipe for every twin, then on held-out data:
- the next-token loss and accuracy at every depth (`probe`: the logits after 0..L blocks); for
  addition the targets are the answer's tokens, and the exact match of the whole answer is scored too;
- the effective depth: the smallest depth within 1% of the best loss (`compress`, metric="loss");
- the training steps until the validation loss first reaches a target, and the step at which it
  first leaves the unigram plateau (10% below the loss of the training targets' unigram
  distribution: what a model that ignores the context reaches, where an ACN can sit for long);
- greedy generation tokens/s (KV cache on) of the model truncated to its effective depth k against the
  full one: the target is at least 0.5 x L/k, and the depth-0 model's own time per token (embedding,
  final norm, head, sampling and the Python loop: what no truncation removes) says what keeps it from L/k.

The recipe, by default the authors' (ACN-NOTES section 2b, read from their language_modeling/
configs): AdamW lr 1e-3, betas (0.9, 0.95), weight decay 0.01 on the linear weights only, OneCycle
(5% warmup from lr/100, cosine down to lr/10), gradient clipping at 1.0, no biases, the scaled output
projections, rotary positions; their H-ACN's gates start at 0 (alpha 1), one per block, clamped to
[0, 1] after every step. What differs from theirs: float32 (they train bf16 on GPUs), no dropout (the
package's GPT has none), and the scale. `recipe="package"` (`paper --lm-recipe package`) is the one
this table used before: lr 3e-3, betas (0.9, 0.999), weight decay 0.1 on every parameter, warmup
then cosine to 0, no clipping, biases, learned positions.

Table 6c trains the rows of METHODS (training.py's methods on the twins) the same way, at the same
steps, at the same training time (each row's time per step measured with the rows' steps interleaved
in one process; a row within TIME_TOLERANCE of the acn's keeps its steps) and LONGER x the steps for
acn, residual and the two best ACN rows; the equal-time budgets follow the measured times, so they are
the one part of a rerun that can differ.

Each run is deterministic on a machine: its seed fixes the initialization and the batches, and it runs
on one thread with torch.use_deterministic_algorithms, so two runs of the same command give the same
table. Across machines the float rounding of the CPU's kernels (their vector width, the BLAS build)
can differ, and an ACN on a plateau amplifies it: the step at which it leaves may move.
"""
from .rows import FULL, QUICK, RECIPE_NAMES, LanguageSettings
from .run import run_language
from .train import ModelsDirError

__all__ = ["FULL", "QUICK", "RECIPE_NAMES", "LanguageSettings", "ModelsDirError", "run_language"]
