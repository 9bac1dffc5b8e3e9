"""What the language tables run: the rows (one record each), the recipes, the settings, and the key of a
run (its data set, row and budget)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...depth import DRAFT_LENGTHS

# The GPTs' connectivity options of the rows.
ACN = dict(connectivity="acn")
RESIDUAL = dict(connectivity="residual")
H_ACN = dict(connectivity="hybrid", gate_scope="block", gate_init=0.0, clamp_range=(0.0, 1.0))  # the authors'
# the authors' LSN as their OWT2 scripts run it: Long_Short, alphas 0.8 trainable, --skipattn
LSN = dict(connectivity="hybrid", gate_scope="block", long_weights=True, x0_weight=True, gates_from_long_weights=True,
           long_weight_init=0.8, skip_attention=True)
# a hybrid whose gates GateAnnealing sets (1: the pre-norm residual GPT, to 0: the ACN, then as_acn)
ANNEALED = dict(connectivity="hybrid", gate_scope="block", learn_gates=False, gate_init=1.0)
ANNEAL_FRACTION, ANNEAL_SHAPE = 0.3, "cosine"
LAYERSKIP_LOSS = dict(weights="uniform", curriculum="rotational")  # training.RECOMMENDED


@dataclass(frozen=True)
class Row:
    """A row of the tables: its GPT (connectivity options), what its steps add to the recipe, and the
    tables it is in ("6": the twins as the recipe trains them; "6c": training an ACN fast)."""
    gpt: dict
    anneal: float | None = None         # GateAnnealing over this fraction of the steps, then as_acn
    exit_loss: dict | None = None       # early_exit_loss's options, the loss in place of the plain one
    layer_dropout: float | None = None  # LayerDropout's p_max (LayerSkip's 0.1)
    layer_dropout_per: str = "sample"   # LayerSkip's; "batch" for the long connections
    tables: tuple = ("6c",)


ROWS = {
    "acn": Row(ACN, tables=("6", "6c")),
    "hybrid": Row(H_ACN, tables=("6",)),                               # the authors' H-ACN
    "hybrid-unit": Row(dict(connectivity="hybrid"), tables=("6",)),    # the package's: a gate per unit, at 0.5
    "residual": Row(RESIDUAL, tables=("6", "6c")),
    "lsn": Row(LSN),
    "anneal": Row(ANNEALED, anneal=ANNEAL_FRACTION),
    "acn+ee": Row(ACN, exit_loss=dict(weights="authors")),
    "anneal+ee": Row(ANNEALED, anneal=ANNEAL_FRACTION, exit_loss=dict(weights="authors")),
    "residual+layerskip": Row(RESIDUAL, exit_loss=LAYERSKIP_LOSS, layer_dropout=0.1),
    "residual+ee": Row(RESIDUAL, exit_loss=dict(weights="uniform")),
    "lsn+ee": Row(LSN, exit_loss=dict(weights="authors")),  # found here: the LSN's depth and shallow exits
    "anneal+layerskip": Row(ANNEALED, anneal=ANNEAL_FRACTION, exit_loss=LAYERSKIP_LOSS,  # LayerSkip's recipe on the
                            layer_dropout=0.1, layer_dropout_per="batch"),              # annealed ACN
}
TABLE6 = tuple(name for name, row in ROWS.items() if "6" in row.tables)      # table 6: the twins
METHODS = tuple(name for name, row in ROWS.items() if "6c" in row.tables)    # table 6c: training an ACN fast
ACN_AT_INFERENCE = ("lsn", "anneal", "acn+ee", "anneal+ee", "lsn+ee", "anneal+layerskip")  # ACNs at inference, or LSNs
LONGER = 3  # the longer run: this many times the steps, for acn, the residual twins and the two best rows
PROMPT = 8  # tokens of each held-out sequence that the generation timing starts from
# validation loss (nats per target token) the steps-to-target column waits for
TARGET_LOSS = {"corpus": 2.5, "addition": 0.5}
PLATEAU = 0.9  # leaving the unigram plateau: a validation loss 10% below the unigram loss
TASKS = ("corpus", "addition")
BUDGETS = ("", "@time", f"x{LONGER}")  # the settings' steps, the acn's training time, LONGER x the steps


@dataclass(frozen=True)
class RunKey:
    """What a run trained: a data set, a row, a budget (BUDGETS)."""
    task: str
    row: str
    budget: str = ""

    @property
    def label(self) -> str:
        """How the tables and the CSV name it: "<task> gpt <row>[ <budget>]"."""
        return f"{self.task} gpt {self.twin}"

    @property
    def twin(self) -> str:
        return f"{self.row} {self.budget}" if self.budget else self.row


@dataclass(frozen=True)
class Recipe:
    name: str
    lr: float
    betas: tuple
    weight_decay: float
    decay_linear_only: bool   # weight decay on nn.Linear weights alone (not norms, embeddings, gates)
    one_cycle: bool           # OneCycle from lr/100 to lr/10; else warmup then cosine to 0
    clip: float | None        # gradient-norm clipping
    model: dict = field(default_factory=dict)  # GPT options


RECIPES = {
    "authors": Recipe("authors", 1e-3, (0.9, 0.95), 0.01, True, True, 1.0,
                      dict(bias=False, scaled_output_init=True, positions="rotary")),
    "package": Recipe("package", 3e-3, (0.9, 0.999), 0.1, False, False, None, dict(positions="learned")),
}
RECIPE_NAMES = {"authors": "the authors' recipe", "package": "the package's earlier recipe"}
WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class LanguageSettings:
    seeds: int
    depth: int
    dim: int
    heads: int
    steps: dict           # training steps per data set
    batch: int
    context: int          # corpus window
    digits: int           # addition operands: 1 to `digits` digits
    eval_every: int
    new_tokens: int       # generated per prompt when timing
    recipe: str = "authors"
    backend: str = "auto"  # the GPTs' (auto: the fused kernels on a GPU, the reference on a CPU)
    draft_lengths: tuple = DRAFT_LENGTHS  # self-speculative decoding's drafts a round (table 6b: the fastest)
    repeats: int = 3      # timed runs of each generation (the median counts)


# Sized for this project's 2-core CPU machine: 2-digit addition needs about 1000 steps of 32 before its
# answers come right, the corpus a few hundred before a model gets past the unigram level.
FULL = LanguageSettings(seeds=4, depth=8, dim=64, heads=4, steps={"corpus": 600, "addition": 1500}, batch=32,
                        context=64, digits=2, eval_every=50, new_tokens=32)
# --quick proves every path runs: one draft length (table 6b's 4 drafts a round), each timing run once.
QUICK = LanguageSettings(seeds=1, depth=4, dim=64, heads=4, steps={"corpus": 40, "addition": 40}, batch=8,
                         context=32, digits=2, eval_every=10, new_tokens=8, draft_lengths=(4,), repeats=1)
