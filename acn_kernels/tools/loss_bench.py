"""`bench --suite loss`: depth_cross_entropy's peak memory and time, loss and backward, at GPT-2's shapes.

Every exit's loss through one final norm and head (vocabulary 50257, width 768, 13 exits: 12 blocks and
x_0) at 1024 to 8192 tokens, for each path: "reference" (every logit materialized, where it fits in this
machine's memory), "chunked" (the chunked path in PyTorch), and on a GPU "triton" (the Triton row
kernel) and "cuda" (its CUDA twin, where the extension is built). Each (path, tokens) runs in a
process of its own, so that one's peak does not hide another's.
The peak is measured beyond the inputs (and, as the issue's target says, beyond the inputs and their
gradients, which any path must hold): on a GPU torch.cuda.max_memory_allocated, on a CPU the process's
peak resident set (VmHWM, restarted once the inputs exist) less what it held then. `--quick`: a smoke run at a
small vocabulary.
"""
from __future__ import annotations

import csv
import multiprocessing
import os
import time
from dataclasses import dataclass

import torch

from ..backend import CUDA_EXTENSION

VOCAB, WIDTH, EXITS = 50257, 768, 13
TOKENS = (1024, 8192)
QUICK = dict(vocab=1000, width=64, exits=13, tokens=(256,))
PROBE_BATCH = 4  # sequences of GPT-2's full context (1024) for the probe's peak against one forward's
PROBE_QUICK = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0)
REFERENCE_BUDGET = 0.6  # of this machine's memory: the reference runs where its logits and their copies fit
BYTES_PER_LOGIT_REFERENCE = 4 * 4  # float32 logits, log-probabilities, their gradient and the softmax's


@dataclass
class LossCase:
    path: str
    tokens: int
    vocab: int
    width: int
    exits: int


def resident_bytes() -> int:
    """This process's resident set now (Linux's /proc/self/statm)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_resident() -> None:
    """Linux's peak resident set (VmHWM) restarts from now, so that the imports' peak does not count."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_resident_bytes() -> int:
    """The peak resident set since the last reset_peak_resident (VmHWM in /proc/self/status)."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def measured(fn, device: str) -> tuple:
    """(seconds, peak bytes beyond what this process held before, fn's result) of fn() in this process."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        reset_peak_resident()
        baseline = resident_bytes()
    began = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = peak_resident_bytes() - baseline
    return time.perf_counter() - began, peak, result


def run_case(case: LossCase, device: str) -> dict:
    """One loss and its backward in this process: seconds, peak bytes beyond the inputs, and beyond the
    inputs and their gradients."""
    from ..ops.depth_cross_entropy import depth_cross_entropy

    torch.manual_seed(0)
    states = torch.randn(case.exits, case.tokens, case.width, device=device, requires_grad=True)
    targets = torch.randint(0, case.vocab, (case.tokens,), device=device)
    norm_weight = torch.ones(case.width, device=device, requires_grad=True)
    norm_bias = torch.zeros(case.width, device=device, requires_grad=True)
    head = (torch.randn(case.vocab, case.width, device=device) / case.width ** 0.5).requires_grad_()
    gradients = sum(t.numel() * t.element_size() for t in (states, norm_weight, norm_bias, head))

    def loss_and_backward():
        loss, _ = depth_cross_entropy(states, targets, norm_weight, norm_bias, head, backend=case.path)
        loss.backward()
        return loss.item()
    seconds, peak, loss = measured(loss_and_backward, device)
    return dict(path=case.path, tokens=case.tokens, seconds=seconds, peak_gib=peak / 2 ** 30,
                beyond_gradients_gib=(peak - gradients) / 2 ** 30, loss=loss)


def run_probe_case(kind: str, quick: bool, device: str) -> dict:
    """An acnify'd GPT-2 (its own config, random weights; a tiny one under quick) on PROBE_BATCH
    sequences of its full context, under no_grad: every depth's loss by probe(output="loss")
    (kind "probe"), or one ordinary forward with labels= (kind "forward"). Seconds, peak, the loss(es)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..convert import acnify

    torch.manual_seed(0)
    config = GPT2Config(**PROBE_QUICK) if quick else GPT2Config()
    model = acnify(GPT2LMHeadModel(config)).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (PROBE_BATCH, config.n_positions), device=device)
    run = (lambda: model.probe(ids, labels=ids, output="loss")) if kind == "probe" else \
        (lambda: model(ids, labels=ids).loss[None])
    with torch.no_grad():
        seconds, peak, losses = measured(run, device)
    return dict(path=f"gpt2 {kind}", tokens=ids.numel(), seconds=seconds, peak_gib=peak / 2 ** 30,
                loss=losses[-1].item(), depths=losses.numel())


def reference_fits(case: LossCase, device: str) -> bool:
    """Whether the reference's logits and their copies fit the device's memory (the GPU's, or this machine's)."""
    total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" \
        else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return case.exits * case.tokens * case.vocab * BYTES_PER_LOGIT_REFERENCE < REFERENCE_BUDGET * total


def run_loss_bench(quick: bool, out: str) -> list:
    """Every (path, tokens) in a process of its own; prints the table and writes loss.csv."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = QUICK if quick else dict(vocab=VOCAB, width=WIDTH, exits=EXITS, tokens=TOKENS)
    paths = ("reference", "chunked") + (("triton",) if device == "cuda" else ()) \
        + (("cuda",) if device == "cuda" and CUDA_EXTENSION is not None else ())
    cases = [LossCase(path, tokens, shape["vocab"], shape["width"], shape["exits"])
             for tokens in shape["tokens"] for path in paths]
    rows = []
    context = multiprocessing.get_context("spawn")
    for case in cases:
        if case.path == "reference" and not reference_fits(case, device):
            rows.append(dict(path=case.path, tokens=case.tokens, skipped=f"its logits do not fit the {device}'s memory"))
            continue
        with context.Pool(1) as pool:
            rows.append(pool.apply(run_case, (case, device)))
    print_loss_table(rows, shape, device, quick)
    from .parallel_loss_bench import parallel_rows, parallelize_rows  # they measure as this module does
    rows += parallel_rows(quick, context) + parallelize_rows(quick, context) + probe_rows(quick, device, context)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "loss.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def probe_rows(quick: bool, device: str, context) -> list:
    """The acnify'd GPT-2's probe(output="loss") against one forward with labels=, each in its own
    process, printed; none (and a line saying why) without transformers."""
    from .._extras import MissingExtra, check_extra

    try:
        check_extra("hf", "transformers")
    except MissingExtra as missing:
        print(f"acnify'd GPT-2 probe(output='loss') against a forward: skipped ({missing})")
        return []
    rows = []
    for kind in ("forward", "probe"):
        with context.Pool(1) as pool:
            rows.append(pool.apply(run_probe_case, (kind, quick, device)))
    forward, probe = rows
    print(f"{'SMOKE RUN: ' if quick else ''}an acnify'd GPT-2{' (tiny)' if quick else ''}, {forward['tokens']} tokens "
          f"under no_grad: every depth's loss (probe, {probe['depths']} depths, one pass of the layers) peaks at "
          f"{probe['peak_gib']:.3f} GiB in {probe['seconds']:.2f} s; one forward with labels= at "
          f"{forward['peak_gib']:.3f} GiB in {forward['seconds']:.2f} s"
          + ("" if quick else f" (target: below it; ratio {probe['peak_gib'] / max(forward['peak_gib'], 1e-9):.2f})"))
    return rows


def print_loss_table(rows: list, shape: dict, device: str, quick: bool) -> None:
    smoke = "SMOKE RUN (--quick, a small vocabulary): " if quick else ""
    print(f"{smoke}depth_cross_entropy, loss and backward: vocabulary {shape['vocab']}, width {shape['width']}, "
          f"{shape['exits']} exits, on {device}; peak memory beyond the inputs (and beyond their gradients too), "
          f"each case in its own process")
    print(f"{'path':<10} {'tokens':>7} {'seconds':>8} {'peak GiB':>9} {'beyond grads GiB':>17}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['path']:<10} {row['tokens']:>7}  skipped: {row['skipped']}")
            continue
        print(f"{row['path']:<10} {row['tokens']:>7} {row['seconds']:>8.2f} {row['peak_gib']:>9.3f} "
              f"{row['beyond_gradients_gib']:>17.3f}")
    by_tokens: dict = {}
    for row in rows:
        if "skipped" not in row:
            by_tokens.setdefault(row["tokens"], {})[row["path"]] = row
    for tokens, paths in by_tokens.items():
        if "reference" in paths and "chunked" in paths and not quick:  # a smoke run draws no verdict
            ratio = paths["chunked"]["peak_gib"] / max(paths["reference"]["peak_gib"], 1e-9)
            speed = paths["chunked"]["seconds"] / paths["reference"]["seconds"]
            print(f"{tokens} tokens: the chunked path's peak is {ratio:.3f} of the reference's (target <= 0.125), its "
                  f"time {speed:.2f}x the reference's (target <= 1.2x on a CPU)")
