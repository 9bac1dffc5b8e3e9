"""The language tables, printed: 6 (the twins), 6b (self-speculative decoding), 6c (training an ACN
fast) with their targets and verdicts. Rows are labelled by their RunKey's label."""
from __future__ import annotations

import statistics

from ..report import print_table, verdict
from .rows import (ACN_AT_INFERENCE, LONGER, METHODS, RECIPE_NAMES, RECIPES, TARGET_LOSS, TASKS, LanguageSettings,
                   RunKey)


def subset(rows: dict, columns: list) -> dict:
    """The rows that have all of `columns`, labelled."""
    return {key.label: values for key, values in rows.items() if all(c in values for c in columns)}


def row_per_seed(rows: dict, row: str, columns: list) -> list:
    """For each seed, the mean of `row`'s values (on both data sets) over `columns`."""
    cells = [values[column] for key, values in rows.items() if key.row == row for column in columns]
    return [statistics.fmean(cell[seed] for cell in cells) for seed in range(len(cells[0]))]


def print_language_tables(settings: LanguageSettings, runs: dict) -> None:
    """Tables 6 and 6b of the twins' runs (RunKey -> {metric: [values over seeds]})."""
    recipe, rows = RECIPES[settings.recipe], {key.label: values for key, values in runs.items()}
    targets = ", ".join(f"{name} {loss:g}" for name, loss in TARGET_LOSS.items())
    steps = ", ".join(f"{name} {count}" for name, count in settings.steps.items())
    print_table(f"6. Language models: GPT, {settings.depth} blocks of dim {settings.dim}, steps of {settings.batch} "
                f"({steps}), {RECIPE_NAMES[recipe.name]} for every twin (hybrid: the authors' H-ACN, hybrid-unit: the "
                f"package's); held-out next-token loss (nats; addition: the answer's tokens), effective depth "
                f"(within 1% of the best loss), steps to a validation loss of {targets}, the step at which the loss "
                f"left the unigram plateau, mean ± std over {settings.seeds} seeds",
                ["best loss", "full-depth loss", "eff. depth", "steps to target", "plateau exit", "accuracy %",
                 "exact match %"], rows, digits=2)
    print_table("    the loss at every depth (the logits after k blocks, both branches of each added)",
                [f"depth {k} loss" for k in range(settings.depth + 1)], rows, digits=2)
    exact = [f"depth {k} exact %" for k in range(settings.depth + 1)]
    print_table("    addition: the exact match of the whole answer at every depth (%)", exact, subset(runs, exact))
    print_plateau_exits(rows)
    generation = subset(runs, list(GENERATION_COLUMNS))
    print_table("    greedy generation (KV cache on, 8 prompts, CPU) of the model truncated to its effective depth k "
                "against the full one; us/token: per generated token of the 8; overhead: the depth-0 model's",
                list(GENERATION_COLUMNS), generation, digits=2)
    ratios = [statistics.fmean(values["speedup / (L/k)"]) for values in generation.values()]
    print(f"target: the truncated model generates >= 0.5 x L/k times the full one's tokens/s: worst "
          f"{min(ratios):.2f} x L/k ({'met' if min(ratios) >= 0.5 else 'not met'}); what keeps it from L/k is the "
          "per-token time that no block count changes (the overhead column)")
    print(verdict(row_per_seed(runs, "residual", ["eff./L"]), row_per_seed(runs, "acn", ["eff./L"]), True,
                  "Auto-compression in language models (the authors' AC-GPT): the ACN reaches its loss with fewer "
                  "blocks", "effective depth / L, residual against acn:"))
    print_speculative_table(settings, runs)
    for twin in ("acn", "hybrid"):
        print(verdict(row_per_seed(runs, twin, ["steps to target"]), row_per_seed(runs, "residual", ["steps to target"]),
                      True, f"The poster's limitation: the {twin} trains slower than the residual twin",
                      f"steps to the target loss, {twin} against residual:"))
        print(verdict(row_per_seed(runs, twin, ["full-depth loss"]), row_per_seed(runs, "residual", ["full-depth loss"]),
                      True, f"... and ends worse: the {twin}'s held-out loss after the same steps is higher",
                      f"held-out loss at the end, {twin} against residual:"))


def print_speculative_table(settings: LanguageSettings, runs: dict) -> None:
    """Table 6b: self-speculative decoding at every draft depth, its verdict and its target."""
    depths, rows = range(1, settings.depth), {key.label: values for key, values in runs.items()}
    print_table("6b. Self-speculative decoding (greedy, KV caches, 8 prompts, CPU): the first k blocks draft, the "
                "full model verifies; tokens identical to the plain cached generate's on every row (checked). "
                "Acceptance rate (%) at 4 drafts a round, per draft depth k",
                [f"draft {k} accepted %" for k in depths], rows)
    lengths = " and ".join(", ".join(map(str, settings.draft_lengths)).rsplit(", ", 1))
    print_table(f"    tokens/s over the plain cached generate's, the fastest of {lengths} drafts a round, per draft "
                "depth k (measured in the same call)", [f"draft {k} speedup" for k in depths], rows, digits=2)
    accepted = lambda row: row_per_seed(runs, row, [f"draft {k} accepted %" for k in depths])  # noqa: E731
    print(verdict(accepted("acn"), accepted("residual"), True,
                  "An ACN's own shallow depths draft with a higher acceptance than the residual twin's at the same "
                  "depth (whose intermediate readouts are not trained to be read)",
                  "acceptance rate over the draft depths (%), acn against residual:"))
    for values in (values for key, values in runs.items() if key.task == "addition" and key.row == "acn"):
        speedups = values.get("speedup at eff. depth", [])
        worst = min(speedups) if speedups else float("nan")
        print(f"target: the trained AC-GPT on addition, drafting at its effective depth, generates >= 1.5x the plain "
              f"cached generate's tokens/s: {len(speedups)} of {len(values['eff. depth'])} seeds have an effective "
              f"depth below L, worst {worst:.2f}x ({'met' if speedups and worst >= 1.5 else 'not met'})")


TRAINING_COLUMNS = ["full-depth loss", "loss at L/4", "loss at L/2", "loss at 3L/4", "eff. depth", "steps to target",
                    "plateau exit", "ms/step", "draft L/2 accepted %", "draft L/2 speedup"]


def with_training_columns(settings: LanguageSettings, values: dict) -> dict:
    """The row's values with table 6c's derived columns: the losses at L/4, L/2, 3L/4 and the draft at L/2."""
    depth = settings.depth
    named = {"loss at L/4": f"depth {depth // 4} loss", "loss at L/2": f"depth {depth // 2} loss",
             "loss at 3L/4": f"depth {3 * depth // 4} loss", "draft L/2 accepted %": f"draft {depth // 2} accepted %",
             "draft L/2 speedup": f"draft {depth // 2} speedup"}
    return {**values, **{name: values[source] for name, source in named.items() if source in values}}


def print_training_tables(settings: LanguageSettings, rows: dict, budget: dict) -> None:
    """Table 6c (rows keyed by RunKey): the training methods at the same steps, at the same training time
    and LONGER x the steps, per data set; then the targets, met or missed by how much."""
    for task in TASKS:
        def at(row: str, budget_name: str = ""):
            key = RunKey(task, row, budget_name)
            return with_training_columns(settings, rows[key]) if key in rows else None
        same_steps = {row: at(row) for row in METHODS}
        same_time = {}
        for row in METHODS:
            timed = (task, row) in budget
            values = at(row, "@time") if timed else at(row)
            values["steps"] = [budget.get((task, row), settings.steps[task])] * settings.seeds
            same_time[RunKey(task, row, "@time" if timed else "").twin] = values
        longer = {row: values for row in METHODS if (values := at(row, f"x{LONGER}")) is not None}
        print_table(f"6c. Training an ACN LM fast, {task}: the methods at the same {settings.steps[task]} "
                    f"steps (held-out loss at full depth and at depths L/4, L/2, 3L/4; ms/step measured with the "
                    f"rows' steps interleaved in one process; self-speculative decoding drafting at L/2)",
                    TRAINING_COLUMNS, same_steps, digits=2)
        print_table(f"    the same training time as the acn's {settings.steps[task]} steps (a row that costs more "
                    f"a step gets fewer)", TRAINING_COLUMNS + ["steps"], same_time, digits=2)
        print_table(f"    {LONGER}x the steps", TRAINING_COLUMNS, longer, digits=2)
        print_training_targets(settings, task, {row: same_time[twin] for row, twin in
                                                 zip(METHODS, same_time)})


def print_training_targets(settings: LanguageSettings, task_name: str, same_time: dict) -> None:
    """The issue's three targets at the same training time (rows by name), for every ACN at inference."""
    mean = lambda row, column: statistics.fmean(same_time[row][column])  # noqa: E731
    residual, ee, layerskip = mean("residual", "full-depth loss"), mean("residual+ee", "loss at L/2"), \
        mean("residual+layerskip", "draft L/2 speedup")
    for row in ACN_AT_INFERENCE:
        loss, depth = mean(row, "full-depth loss"), mean(row, "eff. depth")
        excess = loss / residual - 1
        first = excess <= 0.10 and depth <= 0.75 * settings.depth
        half, speedup = mean(row, "loss at L/2"), mean(row, "draft L/2 speedup")
        print(f"target ({task_name}, {row}, same time): full-depth loss within 10% of the residual's with an "
              f"effective depth <= 0.75 L: {loss:.3f} against {residual:.3f} ({excess:+.0%}), depth {depth:.1f} of "
              f"{settings.depth}: {'met' if first else 'not met'}; loss at L/2 <= the residual + every-depth "
              f"loss's: {half:.3f} against {ee:.3f}: {'met' if half <= ee else f'not met by {half - ee:.3f}'}; "
              f"speculative at L/2 >= 1.5x and ahead of residual + LayerSkip's {layerskip:.2f}x: {speedup:.2f}x: "
              f"{'met' if speedup >= 1.5 and speedup > layerskip else 'not met'}")


def print_plateau_exits(rows: dict) -> None:
    """The step at which each seed's loss left the unigram plateau (one past the budget: never)."""
    print("\n    the step at which the validation loss left the unigram plateau (10% below the unigram loss), per seed")
    for key, values in rows.items():
        print(f"{key:<28}  " + "  ".join(f"{int(step):>5}" for step in values["plateau exit"]))


GENERATION_COLUMNS = ("tokens/s full", "tokens/s truncated", "speedup", "L/k", "speedup / (L/k)", "overhead us/token",
                      "full us/token")
