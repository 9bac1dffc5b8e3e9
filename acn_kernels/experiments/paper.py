"""`python -m acn_kernels paper`: the poster's four claims, measured on this machine.

1. Compression and its payoff: accuracy at every depth, the effective depth (smallest within 1 point
   of the best), and parameters and latency of the model truncated there (`compress`).
2. Noise robustness: the trained acn and residual twins (and the ACN truncated at its effective
   depth) on test inputs with Gaussian or salt-and-pepper noise; inputs scaled to [0, 1].
3. Continual learning: Split-digits and Split-MNIST-1D, 5 tasks of 2 classes, task-incremental (the
   prediction is restricted to the task's classes), naive fine-tuning and Synaptic Intelligence.
4. Training speed: epochs and training seconds until the test accuracy first reaches a target;
   4b. the hybrid (H-ACN, the authors' answer to 4): does it train as fast as the residual twin while
   compressing like the ACN, and where do its learned gates end, layer by layer.
5. Depth on demand (the ACN's own answer to 4): training with ShrinkOnCompression against the full
   ACN and the residual twin, and per-sample early exit at inference, acn against residual.
6. Language models (lm/): AC-GPT and its twins on a byte-level grammar corpus and on n-digit
   addition, loss at every depth, effective depth, steps to a target loss, and the generation speed
   of the model truncated to its effective depth; 6b. self-speculative decoding; 6c. training an ACN
   LM fast (the authors' LSN, gate annealing, early-exit losses, against the residual twin with
   LayerSkip's recipe and with a loss at every depth), at the same steps and the same training time.

Experiments 1, 2, 4 and 5 share one training per data set, model, twin and seed (the test accuracy is
recorded after every epoch). Every table ends with a verdict on the direction of the poster's claim,
paired by seed: per seed, the difference of the two sides averaged over the table's rows and
conditions; "reproduced" or "not reproduced" when the mean of those differences points one way by
more than their standard deviation over the seeds, "inconclusive" otherwise.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass

import torch

from .._extras import require
from ..depth import ShrinkOnCompression, compress, depth_accuracies, early_exit_sweep, smallest_depth_within
from ..models import MLP, Mixer, ViT
from . import continual, lm, noise
from .data import Dataset, load
from .demo import BATCH_SIZE, LEARNING_RATE, train
from .report import cell, mean_std, per_seed, plot_lines, print_table, series, verdict, write_csv

TWINS = ("acn", "residual", "ffn", "hybrid")
TARGETS = {"digits": 95.0, "mnist1d": 30.0}  # test accuracy (%) for the training-speed experiment
CONTINUAL_BATCH = 128
# ShrinkOnCompression in the paper: a probe every 10 optimizer steps, 5 probes to agree (tolerance 0.5, margin 1)
SHRINK_EVERY, SHRINK_PATIENCE = 10, 5
EXIT_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 2.0)  # 2.0: never early, the full model


@dataclass(frozen=True)
class Settings:
    seeds: int
    datasets: tuple
    models: dict            # data set -> ((model, depth, epochs), ...)
    continual_models: tuple
    continual_depths: tuple
    continual_epochs: int
    language: lm.LanguageSettings
    # Chosen on seed 100, which no table reports: c in {0.01, 0.1, 0.5, 1, 5} x xi in {0.01, 0.1, 1}, MLP and
    # Mixer at L=10 on Split-digits, the mean average accuracy of both twins (94.1% at c=1, xi=1).
    si_c: float = 1.0
    si_xi: float = 1.0


FULL = Settings(seeds=3, datasets=("digits", "mnist1d"),
                models={"digits": (("mlp", 12, 25), ("mixer", 8, 12), ("vit", 6, 10)),
                        "mnist1d": (("mlp", 12, 20), ("mixer", 8, 8))},
                continual_models=("mixer", "mlp"), continual_depths=(5, 10, 15), continual_epochs=2,
                language=lm.FULL)
QUICK = Settings(seeds=2, datasets=("digits", "mnist1d"),
                 models={"digits": (("mlp", 6, 6), ("mixer", 4, 4)), "mnist1d": (("mlp", 6, 4),)},
                 continual_models=("mlp",), continual_depths=(5,), continual_epochs=1, language=lm.QUICK)


def build(model: str, data: Dataset, depth: int, connectivity: str) -> torch.nn.Module:
    height, width = data.image_size
    if model == "mlp":
        return MLP(height * width, 64, depth, 10, connectivity=connectivity)
    patch = (2, 2) if height > 1 else (1, 4)
    if model == "mixer":
        return Mixer((height, width), patch, 1, 64, depth, token_dim=32, channel_dim=128, num_classes=10,
                     connectivity=connectivity)
    return ViT((height, width), patch, 1, 64, depth, heads=4, mlp_dim=128, num_classes=10, connectivity=connectivity)


def inputs_for(model: str, x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) if model == "mlp" else x.unsqueeze(1)


# ----------------------------------------------------------------------------- experiments 1, 2, 4

def train_twins(settings: Settings, device: torch.device, tqdm) -> list:
    """One run per data set, model, seed and twin: the trained model and its per-epoch record."""
    jobs = [(d, m, depth, epochs, seed, twin) for d in settings.datasets for m, depth, epochs in settings.models[d]
            for seed in range(settings.seeds) for twin in TWINS]
    return train_runs(jobs, "training twins", device, tqdm)


def train_runs(jobs: list, description: str, device: torch.device, tqdm) -> list:
    """Trains each (data set, model, depth, epochs, seed, twin) job on nine tenths of the training set;
    twin "acn shrinking" is the ACN trained with ShrinkOnCompression, probing the tenth held out."""
    runs, datasets = [], {}
    with tqdm(jobs, desc=description, unit="run") as progress:
        for dataset, model_name, depth, epochs, seed, twin in progress:
            progress.set_postfix_str(f"{dataset} {model_name} {twin} seed {seed}")
            data = datasets.setdefault((dataset, seed), load(dataset, seed))
            runs.append(dict(dataset=dataset, model=model_name, twin=twin, seed=seed,
                             **train_one(data, model_name, depth, epochs, seed, twin, device)))
    return runs


def train_one(data: Dataset, model_name: str, depth: int, epochs: int, seed: int, twin: str,
              device: torch.device) -> dict:
    train_x, test_x = (inputs_for(model_name, x).to(device) for x in (data.train_x, data.test_x))
    train_y, test_y = data.train_y.to(device), data.test_y.to(device)
    torch.manual_seed(seed)
    model = build(model_name, data, depth, twin.split()[0]).to(device)
    # Every twin trains on the same nine tenths: the tenth held out is what ShrinkOnCompression probes.
    held_out = len(train_y) // 10
    shrink = (ShrinkOnCompression(model, train_x[:held_out], train_y[:held_out], every=SHRINK_EVERY,
                                  patience=SHRINK_PATIENCE)
              if twin == "acn shrinking" else None)
    train_x, train_y = train_x[held_out:], train_y[held_out:]
    curve = []

    def record(epoch, seconds):
        model.eval()
        with torch.no_grad():
            curve.append((seconds, 100.0 * (model(test_x).argmax(-1) == test_y).double().mean().item()))
    train(model, train_x, train_y, epochs, torch.Generator().manual_seed(seed), after_epoch=record,
          after_step=shrink.step if shrink is not None else None)
    model.eval()
    steps = epochs * math.ceil(len(train_y) / BATCH_SIZE)
    return dict(net=model, curve=curve, test_x=test_x, test_y=test_y, shrink=shrink,
                block_steps=shrink.block_steps if shrink is not None else steps * depth,
                accuracies=depth_accuracies(model, test_x, test_y))


def label(run: dict, twin: str | None = None) -> str:
    return f"{run['dataset']} {run['model']} {twin or run['twin']}"


def compression(runs: list, out: str) -> None:
    rows, records = defaultdict(lambda: defaultdict(list)), []
    for run in runs:
        accuracies = run["accuracies"]
        depth = smallest_depth_within(accuracies, 1.0)
        values = {"best %": max(accuracies), "full depth %": accuracies[-1], "eff. depth": depth,
                  "eff./L": depth / (len(accuracies) - 1)}
        if run["twin"] == "acn":
            report = compress(run["net"], run["test_x"], run["test_y"], tolerance=1.0, repeats=10)
            values.update({"params kept %": 100.0 * report.parameters[1] / report.parameters[0],
                           "speedup x": report.speedup})
        values.update({f"depth {k} %": a for k, a in enumerate(accuracies)})
        for metric, value in values.items():
            rows[label(run)][metric].append(value)
            records.append(record(run, metric, value))
    print_table("1. Compression: accuracy and effective depth (within 1 point of the best), mean ± std over seeds",
                ["best %", "full depth %", "eff. depth", "eff./L", "params kept %", "speedup x"], rows)
    print(verdict(per_seed(rows, " residual", ["eff./L"]), per_seed(rows, " acn", ["eff./L"]), True,
                  "Poster: the ACN reaches its accuracy with fewer layers than the residual twin (AC-ViT at 6 of 12)",
                  "effective depth / L, residual against acn:"))
    write_csv(os.path.join(out, "compression.csv"), records)
    plot_lines(os.path.join(out, "compression.png"), rows, lambda values: series(values, "depth", 0),
               "depth k (blocks used)", "test accuracy (%)")


def record(run: dict, metric: str, value: float, twin: str | None = None) -> dict:
    return dict(dataset=run["dataset"], model=run["model"], twin=twin or run["twin"], seed=run["seed"],
                metric=metric, value=value)


def noise_robustness(runs: list, out: str, device: torch.device) -> None:
    rows, records = defaultdict(lambda: defaultdict(list)), []
    for run in (r for r in runs if r["twin"] in ("acn", "residual", "hybrid")):
        nets = {run["twin"]: run["net"]}
        if run["twin"] == "acn":
            nets["acn truncated"] = run["net"].truncate(smallest_depth_within(run["accuracies"], 1.0))
        for twin, net in nets.items():
            for condition, corrupt in noise.CONDITIONS.items():
                generator = torch.Generator(device=device).manual_seed(1000 + run["seed"])
                accuracy = 100.0 * (net(corrupt(run["test_x"], generator)).argmax(-1) == run["test_y"]).double()
                value = accuracy.mean().item()
                rows[label(run, twin)][condition].append(value)
                records.append(record(run, condition, value, twin))
    columns = list(noise.CONDITIONS)
    print_table("2. Noise robustness: test accuracy (%) under noise, inputs in [0, 1], mean ± std over seeds",
                columns, rows)
    noisy = lambda suffix: per_seed(rows, suffix, columns[1:])  # noqa: E731
    print(verdict(noisy(" acn"), noisy(" residual"), True, "Poster: the ACN is more robust to noise (ImageNet, "
                  "gauss 0.4: 51.89 vs 45.46)", "accuracy under noise, acn against residual:"))
    print(verdict(noisy(" acn truncated"), noisy(" acn"), True, "Poster's explanation: unused depth stops "
                  "propagating noise", "accuracy under noise, the ACN truncated at its effective depth against "
                  "the full ACN:"))
    write_csv(os.path.join(out, "noise.csv"), records)
    plot_lines(os.path.join(out, "noise.png"), rows, lambda values: [
        (i, statistics.fmean(values[c])) for i, c in enumerate(columns)], "condition: " + ", ".join(columns),
        "test accuracy (%)")


def to_target(run: dict) -> tuple:
    """(epochs, training seconds) until the test accuracy first reached the data set's target; a run
    that never reaches it counts as one epoch past its budget (and all its seconds)."""
    curve = run["curve"]
    return next(((epoch + 1, seconds) for epoch, (seconds, accuracy) in enumerate(curve)
                 if accuracy >= TARGETS[run["dataset"]]), (len(curve) + 1, curve[-1][0]))


def training_speed(runs: list, out: str) -> None:
    rows, records = defaultdict(lambda: defaultdict(list)), []
    for run in runs:
        curve = run["curve"]
        epochs, seconds = to_target(run)
        values = {"epochs": epochs, "seconds": seconds, "reached %": 100.0 * (epochs <= len(curve)),
                  "final %": curve[-1][1]}
        values.update({f"epoch {e + 1} %": accuracy for e, (_, accuracy) in enumerate(run["curve"])})
        for metric, value in values.items():
            rows[label(run)][metric].append(value)
            records.append(record(run, metric, value))
    targets = ", ".join(f"{name} {target:g}%" for name, target in TARGETS.items())
    print_table(f"4. Training speed: epochs and training seconds until the test accuracy first reaches the target "
                f"({targets}; never: one epoch past the budget), mean ± std over seeds",
                ["epochs", "seconds", "reached %", "final %"], rows)
    epochs = lambda suffix: per_seed(rows, suffix, ["epochs"])  # noqa: E731
    print(verdict(epochs(" acn"), epochs(" residual"), True, "Poster's limitation: the ACN trains slower (AC-ViT "
                  "700 epochs against 300)", "epochs to the target, acn against residual:"))
    write_csv(os.path.join(out, "training_speed.csv"), records)
    plot_lines(os.path.join(out, "training_speed.png"), rows, lambda values: series(values, "epoch", 1),
               "epoch", "test accuracy (%)")


def hybrid_twin(runs: list, out: str) -> None:
    """The hybrid against the residual twin's speed and the ACN's compression, and its learned gates."""
    rows, gate_rows, records = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list)), []
    by_key = {(r["dataset"], r["model"], r["seed"], r["twin"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    speed_gap, depth_gap = defaultdict(list), defaultdict(list)  # per seed, over data sets and models
    for (dataset, model, seed, twin), run in by_key.items():
        if twin != "hybrid":
            continue
        depth = {t: smallest_depth_within(by_key[dataset, model, seed, t]["accuracies"], 1.0)
                 for t in ("acn", "hybrid", "residual")}
        epochs = {t: to_target(by_key[dataset, model, seed, t])[0] for t in ("acn", "hybrid", "residual")}
        speed_gap[seed].append(epochs["hybrid"] - epochs["residual"])
        depth_gap[seed].append(depth["hybrid"] - depth["acn"])
        values = {**{f"epochs {t}": e for t, e in epochs.items()}, **{f"eff. depth {t}": d for t, d in depth.items()}}
        gates = [g.item() for g in run["net"].gates]
        values["mean gate"] = statistics.fmean(gates) if gates else float("nan")
        for metric, value in values.items():
            rows[f"{dataset} {model}"][metric].append(value)
            records.append(record(run, metric, value))
        for i, gate in enumerate(gates):
            gate_rows[f"{dataset} {model} hybrid"][f"gate {i + 1}"].append(gate)
            records.append(record(run, f"gate {i + 1}", gate))
    print_table("4b. The hybrid (H-ACN: a learnable gate on a short path beside the long one, each gate starting at "
                "0.5): epochs to the target and effective depth against the residual and acn twins, mean ± std over "
                "seeds", ["epochs hybrid", "epochs residual", "epochs acn", "eff. depth hybrid", "eff. depth acn",
                          "eff. depth residual", "mean gate"], rows)
    gate_columns = sorted({c for values in gate_rows.values() for c in values}, key=lambda c: int(c.split()[1]))
    print_table("    the learned gates at the end of training, gate i joining block i's output into block i+1's "
                "input, mean ± std over seeds", gate_columns, gate_rows, digits=2)
    print(hybrid_verdict([statistics.fmean(speed_gap[s]) for s in seeds],
                         [statistics.fmean(depth_gap[s]) for s in seeds]))
    write_csv(os.path.join(out, "hybrid.csv"), records)
    plot_lines(os.path.join(out, "hybrid.png"), gate_rows, lambda values: [
        (int(c.split()[1]), statistics.fmean(values[c])) for c in gate_columns if c in values], "gate i",
        "learned gate value")


def hybrid_verdict(speed_gaps: list, depth_gaps: list) -> str:
    """The claim holds when the hybrid is not slower than the residual twin beyond the seeds' spread
    (epochs to the target, per seed the mean of hybrid - residual over data sets and models) and its
    effective depth is within one block of the ACN's (the mean of hybrid - acn)."""
    speed, speed_spread = mean_std(speed_gaps)
    depth, _ = mean_std(depth_gaps)
    as_fast, compresses = speed <= speed_spread, depth <= 1.0
    word = "reproduced" if as_fast and compresses else "not reproduced"
    return (f"verdict: {word}. The hybrid trains as fast as the residual twin while keeping the ACN's "
            f"auto-compression: epochs to the target, hybrid - residual {speed:+.2f} ± {speed_spread:.2f} "
            f"({'not slower' if as_fast else 'slower'}); effective depth, hybrid - acn {depth:+.2f} "
            f"({'within' if compresses else 'beyond'} one block), over {len(speed_gaps)} seeds")


# ----------------------------------------------------------------------------- experiment 3

def continual_learning(settings: Settings, out: str, device: torch.device, tqdm) -> None:
    rows, records = defaultdict(lambda: defaultdict(list)), []
    jobs = [(d, m, depth, method, seed, twin) for d in settings.datasets for m in settings.continual_models
            for depth in settings.continual_depths for method in ("naive", "SI") for seed in range(settings.seeds)
            for twin in ("acn", "residual")]
    with tqdm(jobs, desc="continual learning", unit="run") as progress:
        for dataset, model_name, depth, method, seed, twin in progress:
            progress.set_postfix_str(f"{dataset} {model_name} L={depth} {method} {twin} seed {seed}")
            data = load(dataset, seed)
            tasks = [[(classes, inputs_for(model_name, x[i]).to(device), y[i].to(device))
                      for classes, i in continual.split_tasks(y)] for x, y in ((data.train_x, data.train_y),
                                                                             (data.test_x, data.test_y))]
            torch.manual_seed(seed)
            model = build(model_name, data, depth, twin).to(device)
            si = continual.SynapticIntelligence(model.parameters(), settings.si_c, settings.si_xi) \
                if method == "SI" else None
            matrix = continual.learn_tasks(model, tasks[0], tasks[1], settings.continual_epochs, CONTINUAL_BATCH,
                                           LEARNING_RATE, si, torch.Generator().manual_seed(seed))
            key = f"{dataset} {model_name} L={depth} {method} {twin}"
            run = dict(dataset=dataset, model=f"{model_name} L={depth} {method}", twin=twin, seed=seed)
            for metric, value in (("average accuracy %", continual.average_accuracy(matrix)),
                                  ("forgetting %", continual.average_forgetting(matrix))):
                rows[key][metric].append(value)
                records.append(record(run, metric, value))
    print_table("3. Continual learning (task-incremental: predictions restricted to the task's classes), 5 tasks of "
                "2 classes, after the last task, mean ± std over seeds", ["average accuracy %", "forgetting %"], rows)
    deepest = max(settings.continual_depths)
    model = settings.continual_models[0]
    forgetting = lambda twin: per_seed(rows, f"{model} L={deepest} SI {twin}", ["forgetting %"])  # noqa: E731
    print(verdict(forgetting("residual"), forgetting("acn"), True, f"Poster: the ACN forgets less (Split CIFAR-100, "
                  f"Mixer, SI, L=15: 32.0% vs 50.0%); here {model}, SI, L={deepest}",
                  "forgetting, residual against acn:"))
    write_csv(os.path.join(out, "continual.csv"), records)
    plot_lines(os.path.join(out, "continual.png"), rows, lambda values: [
        (0, statistics.fmean(values["average accuracy %"])), (1, statistics.fmean(values["forgetting %"]))],
        "0: average accuracy, 1: forgetting", "%")


# ----------------------------------------------------------------------------- experiment 5

def shrinking(settings: Settings, runs: list, out: str, device: torch.device, tqdm) -> None:
    """The full ACN and its residual twin (from the shared runs) against the ACN trained with
    ShrinkOnCompression, MLP and Mixer."""
    jobs = [(d, m, depth, epochs, seed, "acn shrinking") for d in settings.datasets
            for m, depth, epochs in settings.models[d] if m in ("mlp", "mixer") for seed in range(settings.seeds)]
    shrunk = train_runs(jobs, "training with shrinking", device, tqdm)
    rows, records = defaultdict(lambda: defaultdict(list)), []
    shrunk_keys = {(r["dataset"], r["model"]) for r in shrunk}
    for run in [r for r in runs if (r["dataset"], r["model"]) in shrunk_keys and r["twin"] != "ffn"] + shrunk:
        epochs, seconds = to_target(run)
        values = {"final %": run["curve"][-1][1], "epochs to target": epochs, "s to target": seconds,
                  "train s": run["curve"][-1][0], "block-steps k": run["block_steps"] / 1000,
                  "final depth": len(run["accuracies"]) - 1}
        for metric, value in values.items():
            rows[label(run)][metric].append(value)
            records.append(record(run, metric, value))
        for event in run["shrink"].shrinks if run["shrink"] else []:
            records.append(record(run, f"shrink at step {event.step}: {event.previous} ->", event.depth))
    print_table(f"5a. Shrinking while training (ShrinkOnCompression: probe every {SHRINK_EVERY} steps on the tenth "
                f"of the training set held out, tolerance 0.5 pt, patience {SHRINK_PATIENCE}, margin 1), mean ± std "
                "over seeds", ["final %", "epochs to target", "s to target", "train s", "block-steps k", "final depth"],
                rows)
    final = lambda suffix: per_seed(rows, suffix, ["final %"])  # noqa: E731
    seconds = lambda suffix: per_seed(rows, suffix, ["train s"])  # noqa: E731
    accuracy_gap = [a - b for a, b in zip(final(" acn shrinking"), final(" acn"))]
    time_ratio = statistics.fmean(seconds(" acn shrinking")) / statistics.fmean(seconds(" acn"))
    print(f"target: final accuracy within 0.5 points of the full ACN's: shrinking - full = "
          f"{cell(accuracy_gap, 2)} points ({'met' if statistics.fmean(accuracy_gap) >= -0.5 else 'not met'})")
    print(f"target: at most 0.7x the full ACN's training wall-clock: {time_ratio:.2f}x "
          f"({'met' if time_ratio <= 0.7 else 'not met'}); against the residual twin's: "
          f"{statistics.fmean(seconds(' acn shrinking')) / statistics.fmean(seconds(' residual')):.2f}x")
    write_csv(os.path.join(out, "shrinking.csv"), records)
    plot_lines(os.path.join(out, "shrinking.png"), rows, lambda values: [
        (0, statistics.fmean(values["train s"])), (1, statistics.fmean(values["block-steps k"]))],
        "0: training seconds, 1: thousands of block-steps", "")


def early_exit(runs: list, out: str) -> None:
    """Per-sample early exit on the acn and residual twins: the sweep over EXIT_THRESHOLDS, and at the
    lowest threshold whose accuracy is within 0.5 points of the full model's, the blocks per sample."""
    rows, records, curves = defaultdict(lambda: defaultdict(list)), [], defaultdict(lambda: defaultdict(list))
    for run in (r for r in runs if r["twin"] in ("acn", "residual", "hybrid")):
        sweep = early_exit_sweep(run["net"], run["test_x"], run["test_y"], EXIT_THRESHOLDS)
        full = sweep[-1]
        chosen = next(row for row in sweep if row["accuracy"] >= full["accuracy"] - 0.5)
        values = {"full %": full["accuracy"], "threshold": chosen["threshold"], "exit %": chosen["accuracy"],
                  "blocks/sample": chosen["depth"], "blocks/L": chosen["depth"] / full["depth"]}
        for metric, value in values.items():
            rows[label(run)][metric].append(value)
            records.append(record(run, metric, value))
        for row in sweep:
            curves[label(run)][f"blocks {row['threshold']}"].append(row["depth"] / full["depth"])
            curves[label(run)][f"accuracy {row['threshold']}"].append(row["accuracy"])
            records.append(record(run, f"threshold {row['threshold']}: accuracy %", row["accuracy"]))
            records.append(record(run, f"threshold {row['threshold']}: blocks/sample", row["depth"]))
    print_table("5b. Early exit per sample (model.early_exit): the lowest threshold within 0.5 points of the full "
                f"model's accuracy, of {EXIT_THRESHOLDS[:-1]}, and the blocks each sample ran, mean ± std over seeds",
                ["full %", "threshold", "exit %", "blocks/sample", "blocks/L"], rows)
    blocks = lambda suffix: per_seed(rows, suffix, ["blocks/L"])  # noqa: E731
    print(verdict(blocks(" residual"), blocks(" acn"), True, "Poster: early exit saves more in the ACN (AC-Mixer "
                  "3.3x fewer FLOPs against 2.4x for the residual Mixer)", "blocks per sample / L, residual "
                  f"against acn ({1 / max(statistics.fmean(blocks(' acn')), 1e-9):.2f}x fewer blocks against "
                  f"{1 / max(statistics.fmean(blocks(' residual')), 1e-9):.2f}x):"))
    write_csv(os.path.join(out, "early_exit.csv"), records)
    plot_lines(os.path.join(out, "early_exit.png"), curves, lambda values: [
        (statistics.fmean(values[f"blocks {t}"]), statistics.fmean(values[f"accuracy {t}"]))
        for t in EXIT_THRESHOLDS], "blocks per sample / L", "test accuracy (%)")


# ----------------------------------------------------------------------------- output

def run_paper(quick: bool = False, seeds: int | None = None, out: str = "paper_results",
              device: str | None = None, si_c: float | None = None, si_xi: float | None = None,
              tables: str = "all", lm_recipe: str = "authors", lm_workers: int = 1,
              lm_models: str | None = None) -> int:
    tqdm = require("tqdm", "paper", "paper").tqdm
    require("mnist1d.data", "paper", "paper (MNIST-1D)")
    settings = QUICK if quick else FULL
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    given = {"seeds": seeds, "si_c": si_c, "si_xi": si_xi}
    settings = Settings(**{**settings.__dict__, **{k: v for k, v in given.items() if v is not None}})
    settings = Settings(**{**settings.__dict__, "language": dataclasses.replace(
        settings.language, recipe=lm_recipe, **({"seeds": seeds} if seeds is not None else {}))})
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(out, exist_ok=True)
    print(f"paper{' --quick' if quick else ''}: tables {tables}, {settings.seeds} seeds on {device} (table 6: "
          f"{settings.language.seeds}, {lm.RECIPE_NAMES[lm_recipe]}), SI c={settings.si_c:g} "
          f"xi={settings.si_xi:g}; CSVs and PNGs in {out}/")
    if tables in ("all", "classification"):
        runs = train_twins(settings, device, tqdm)
        compression(runs, out)
        noise_robustness(runs, out, device)
        continual_learning(settings, out, device, tqdm)
        training_speed(runs, out)
        hybrid_twin(runs, out)
        shrinking(settings, runs, out, device, tqdm)
        early_exit(runs, out)
    if tables in ("all", "language"):
        lm.run_language(settings.language, out, tqdm, lm_workers, lm_models)
    return 0
