"""The language tables' runs, in order: every row on both data sets at the settings' steps, the 6c rows
at the acn's training time (their time per step measured interleaved in one process) and LONGER x the
steps for the acn, the residual twins and the two best ACN rows; in processes of one thread each where
asked (the same numbers, sooner)."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import statistics
import time
from collections import defaultdict

import torch

from ..report import plot_lines, write_csv
from .evaluate import run_one
from .rows import ACN_AT_INFERENCE, LONGER, METHODS, ROWS, TABLE6, TASKS, LanguageSettings, RunKey
from .tables import print_language_tables, print_training_tables
from .tasks import task_of
from .train import Trainer, build, deterministic


def run_jobs(settings: LanguageSettings, jobs: list, workers: int, tqdm, save_dir: str | None = None) -> list:
    """run_one of every (task, seed, row, steps), in order (steps None: the settings'; only those runs
    are saved in save_dir); with workers > 1 in that many processes (each run is one thread, so the
    results do not change; the timing columns see the other runs)."""
    def arguments(task_name, seed, row, steps):
        return settings, task_name, row, seed, save_dir if steps is None else None, steps
    if workers == 1:
        results = []
        with tqdm(jobs, desc="language models", unit="run") as progress:
            for job in progress:
                progress.set_postfix_str(f"{job[0]} {job[2]} seed {job[1]}" + (f" {job[3]} steps" if job[3] else ""))
                results.append(run_one(*arguments(*job)))
        return results
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads inherited mid-flight
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(run_one, *arguments(*job)) for job in jobs]
        for _ in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="language models",
                      unit="run"):
            pass
        return [future.result() for future in futures]


TIMING_ROUNDS = 12  # interleaved steps of every row; the first two of each are warmup


def step_times(settings: LanguageSettings, task_name: str, rows: tuple) -> dict:
    """{row: seconds per training step}, the rows' steps interleaved in this process (one thread, as
    the runs train) so that a shared machine slows them alike: the median of TIMING_ROUNDS - 2."""
    task = task_of(settings, task_name)
    inputs, targets = task.batches(torch.Generator().manual_seed(0))
    seconds = defaultdict(list)
    with deterministic():
        trainers = {}
        for row in rows:
            torch.manual_seed(0)
            trainers[row] = Trainer(build(settings, row, task), settings, ROWS[row], settings.steps[task_name])
        for round_ in range(TIMING_ROUNDS):
            for row, trainer in trainers.items():
                began = time.perf_counter()
                trainer.step(inputs, targets, round_ + 1)
                seconds[row].append(time.perf_counter() - began)
    return {row: statistics.median(times[2:]) for row, times in seconds.items()}


TIME_TOLERANCE = 0.03  # rows within 3% of the acn's time per step (about the timing's noise) keep its steps


def equal_time_steps(settings: LanguageSettings, times: dict) -> dict:
    """{(task, row): steps} of the same training time as the acn's settings.steps: fewer for a row
    that costs more a step (none listed where they are the same steps, within TIME_TOLERANCE)."""
    budget = {}
    for (task_name, row), seconds in times.items():
        ratio = times[(task_name, "acn")] / seconds
        if abs(ratio - 1) > TIME_TOLERANCE:
            budget[(task_name, row)] = round(settings.steps[task_name] * ratio)
    return budget


def run_language(settings: LanguageSettings, out: str, tqdm, workers: int = 1, save_dir: str | None = None) -> None:
    """Trains every row on both data sets and prints table 6 (the twins), 6b (speculative decoding) and
    6c (training an ACN fast: the methods at the same steps, at the same training time, and LONGER x the
    steps for acn, residual, the residual with a loss at every depth (the baseline for shallow readouts) and
    the two best methods), their targets and verdicts."""
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
    seeds = range(settings.seeds)
    rows, records = defaultdict(lambda: defaultdict(list)), []

    def run(keys: list, steps) -> None:
        jobs = [(key.task, seed, key.row, steps(key)) for key in keys for seed in seeds]
        for (_, seed, _, _), key, result in zip(jobs, [k for k in keys for _ in seeds],
                                                run_jobs(settings, jobs, workers, tqdm, save_dir)):
            for metric, value in result.items():
                rows[key][metric].append(value)
                records.append(dict(dataset=key.task, model="gpt", twin=key.twin, seed=seed, metric=metric,
                                    value=value))
    run([RunKey(task, row) for task in TASKS for row in ROWS], lambda key: None)
    times = {(task, row): seconds for task in TASKS for row, seconds in step_times(settings, task, METHODS).items()}
    for (task, row), seconds in times.items():
        rows[RunKey(task, row)]["ms/step"] = [1e3 * seconds] * settings.seeds
    budget = equal_time_steps(settings, times)
    run([RunKey(task, row, "@time") for task, row in budget], lambda key: budget[(key.task, key.row)])
    longer = [RunKey(task, row, f"x{LONGER}") for task in TASKS
              for row in ("acn", "residual", "residual+ee", *best_methods(rows, task, budget))]
    run(longer, lambda key: LONGER * settings.steps[key.task])
    twins = {key: values for key, values in rows.items() if key.row in TABLE6 and not key.budget}
    print_language_tables(settings, twins)
    print_training_tables(settings, rows, budget)
    write_csv(f"{out}/language.csv", records)
    plot_lines(f"{out}/language.png", {key.label: values for key, values in twins.items()},
               lambda values: [(k, statistics.fmean(values[f"depth {k} loss"])) for k in range(settings.depth + 1)],
               "depth k (blocks used)", "held-out loss (nats)")


def best_methods(rows: dict, task: str, budget: dict) -> list:
    """The two ACN methods with the lowest full-depth loss at the same training time on a data set."""
    def loss(row):
        return statistics.fmean(rows[RunKey(task, row, "@time" if (task, row) in budget else "")]["full-depth loss"])
    return sorted(ACN_AT_INFERENCE, key=loss)[:2]
