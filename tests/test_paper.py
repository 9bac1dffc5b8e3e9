"""The experiment code of `python -m acn_kernels paper`, not its outcomes: the noise functions, the task
split, Synaptic Intelligence on a problem worked by hand, the continual-learning arithmetic, the
verdict rule, and `paper --quick` end to end."""
import dataclasses
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from acn_kernels.experiments import continual, noise, text
from acn_kernels.experiments.paper import hybrid_verdict, verdict

CORPUS_SHA256 = "eb9fd6be52e40f0562d6576f3130337c757fff7402b906d2dab9296e6dc4eaed"  # the default corpus, pinned


def test_noise_of_strength_zero_is_the_identity():
    x = torch.rand(50, 40)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(noise.gaussian(x, 0.0, g), x)
    assert torch.equal(noise.salt_and_pepper(x, 0.0, g), x)
    assert torch.equal(noise.CONDITIONS["clean"](x, g), x)


def test_salt_and_pepper_sends_about_p_of_the_values_to_the_ends():
    x = torch.rand(200, 200) * 0.8 + 0.1  # no value at 0 or 1 before
    noisy = noise.salt_and_pepper(x, 0.05, torch.Generator().manual_seed(0))
    changed = noisy != x
    assert 0.045 < changed.double().mean() < 0.055
    assert set(noisy[changed].unique().tolist()) == {0.0, 1.0}
    assert 0.4 < (noisy[changed] == 1).double().mean() < 0.6


def test_gaussian_noise_has_its_sigma_and_stays_in_range():
    x = torch.full((400, 400), 0.5)
    noisy = noise.gaussian(x, 0.1, torch.Generator().manual_seed(0))
    assert abs((noisy - x).std().item() - 0.1) < 0.002 and noisy.min() >= 0 and noisy.max() <= 1


def test_tasks_split_the_classes_and_use_every_sample_once():
    labels = torch.randint(0, 10, (1000,))
    tasks = continual.split_tasks(labels)
    assert [classes for classes, _ in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    indices = torch.cat([i for _, i in tasks])
    assert torch.equal(indices.sort().values, torch.arange(1000))
    for classes, i in tasks:
        assert set(labels[i].tolist()) == set(classes)


def test_synaptic_intelligence_on_a_problem_worked_by_hand():
    """loss = a^2, b unused; two SGD steps of lr 0.25 from a = b = 1: a goes 1 -> 0.5 -> 0.25 with
    gradients 2 and 1. Path integral w_a = 2 * 0.5 + 1 * 0.25 = 1.25, w_b = 0; importance
    1.25 / (0.75^2 + xi) with xi = 0.1, i.e. 1.886792..., and 0 for b; the anchor is (0.25, 1)."""
    a, b = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(1.0))
    si = continual.SynapticIntelligence([a, b], c=2.0, xi=0.1)
    optimizer = torch.optim.SGD([a, b], lr=0.25)
    for _ in range(2):
        optimizer.zero_grad()
        (a * a + 0 * b).backward()
        si.record_gradients()
        si.penalty().backward()  # zero before the first task ends
        optimizer.step()
        si.after_step()
    si.end_task()
    torch.testing.assert_close(si.importance[0], torch.tensor(1.25 / 0.6625))
    torch.testing.assert_close(si.importance[1], torch.tensor(0.0))
    torch.testing.assert_close(torch.stack(si.anchor), torch.tensor([0.25, 1.0]))
    with torch.no_grad():
        a.fill_(0.5)
    torch.testing.assert_close(si.penalty(), torch.tensor(2.0 * 1.25 / 0.6625 * 0.25 ** 2))


def test_average_accuracy_and_forgetting_of_a_given_matrix():
    matrix = [[90.0, 10.0, 0.0],
              [70.0, 95.0, 0.0],
              [80.0, 60.0, 99.0]]
    assert continual.average_accuracy(matrix) == pytest.approx((80 + 60 + 99) / 3)
    # task 0: best 90, final 80 -> 10; task 1: best 95, final 60 -> 35; the last task does not count
    assert continual.average_forgetting(matrix) == pytest.approx((10 + 35) / 2)


def test_the_corpus_is_the_same_bytes_everywhere_and_a_million_tokens():
    data = text.corpus()
    assert len(data) >= 1_000_000 and hashlib.sha256(data).hexdigest() == CORPUS_SHA256
    assert data.isascii() and b'"' in data and b"(" in data and b"counted: " in data


def test_additions_reverse_their_answers_and_mask_them():
    assert text.addition_line(493, 85) == "493+85=875\n"
    lines = text.addition_examples(200, 3, seed=0)
    assert lines == text.addition_examples(200, 3, seed=0) and len(set(lines)) > 150
    for line in lines:
        a, rest = line.split("+")
        b, answer = rest.split("=")
        assert int(answer[::-1]) == int(a) + int(b) and max(len(a), len(b)) <= 3
    encoded = text.encode_additions(["12+9=12\n"], 10)
    assert bytes(encoded.tokens[0].tolist()) == b"12+9=12\n\n\n"
    # next-token targets 4..6 are the answer's "1", "2" and "\n" (target i predicts token i + 1)
    assert encoded.answer[0].tolist() == [False] * 4 + [True] * 3 + [False] * 2


def test_restricted_logits_predict_only_the_tasks_classes():
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0]])
    assert continual.restrict(logits, [2, 3]).argmax(-1).item() == 2


def test_the_verdict_follows_the_direction_beyond_the_spread():
    assert verdict([10, 11, 12], [5, 6, 7], True, "claim", "x").startswith("verdict: reproduced.")
    assert verdict([10, 11, 12], [5, 6, 7], False, "claim", "x").startswith("verdict: not reproduced.")
    assert verdict([10, 14, 6], [9, 8, 10], True, "claim", "x").startswith("verdict: inconclusive.")  # -4..+6
    assert verdict([10, 11, 12], [9, 10, 13], True, "claim", "x").startswith("verdict: inconclusive.")  # paired
    assert "x 11.00 against 6.00, difference +5.00 ± 0.00 over 3 seeds" in verdict([10, 11, 12], [5, 6, 7], True,
                                                                                    "c", "x")


def test_the_hybrid_verdict_needs_both_the_speed_and_the_compression():
    assert hybrid_verdict([0.0, 1.0], [0.5, 1.0]).startswith("verdict: reproduced.")          # +0.5 within 0.71
    assert hybrid_verdict([2.0, 3.0], [0.0, 0.0]).startswith("verdict: not reproduced.")      # slower: +2.5 > 0.71
    assert hybrid_verdict([-1.0, -1.0], [2.0, 1.0]).startswith("verdict: not reproduced.")    # 1.5 blocks deeper
    assert "hybrid - residual -1.00 ± 0.00 (not slower); effective depth, hybrid - acn +1.50 (beyond one block)" in \
        hybrid_verdict([-1.0, -1.0], [2.0, 1.0])


@pytest.mark.slow
def test_paper_quick_writes_its_tables_csvs_and_plots(tmp_path):
    pytest.importorskip("mnist1d", reason="the paper's MNIST-1D data needs the [paper] extra")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    result = subprocess.run([sys.executable, "-m", "acn_kernels", "paper", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for title in ("1. Compression", "2. Noise robustness", "3. Continual learning", "4. Training speed",
                  "4b. The hybrid", "5a. Shrinking while training", "5b. Early exit per sample", "6. Language models",
                  "6c. Training an ACN LM fast, corpus", "6c. Training an ACN LM fast, addition"):
        assert title in result.stdout
    assert result.stdout.count("verdict: ") == 13 and result.stdout.count("target: ") == 4
    for task in ("corpus", "addition"):  # table 6c's targets: each ACN row at the same training time
        assert result.stdout.count(f"target ({task}, ") == 6
    longer = result.stdout.split("3x the steps")[1:]  # acn, the residual twins and the two best ACN rows
    assert len(longer) == 2
    for table in longer:
        labels = {line.split()[0] for line in table.split("target (")[0].splitlines()[2:] if line.strip()}
        assert {"acn", "residual", "residual+ee"} < labels and len(labels) == 5, labels
    for name in ("compression", "noise", "continual", "training_speed", "hybrid", "shrinking", "early_exit",
                 "language"):
        assert (tmp_path / f"{name}.csv").read_text().startswith("dataset,model,twin,seed,metric,value")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- table 6: the language models

TIMINGS = ("tokens/s", "us/token", "speedup", "length")  # measured by the clock (length: the fastest)


def quick_language():
    """table 6's quick settings on the reference backend (under the interpreter auto would pick Triton's)."""
    from acn_kernels.experiments import lm
    return dataclasses.replace(lm.QUICK, backend="reference")


def test_the_authors_recipe_decays_the_linear_weights_alone_and_runs_one_cycle():
    from acn_kernels.experiments import lm

    settings = quick_language()
    model = lm.train.build(settings, "hybrid", lm.tasks.task_of(settings, "addition"))
    recipe = lm.rows.RECIPES["authors"]
    decayed, rest = lm.train.parameter_groups(model, recipe)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decayed["params"]} == linear - {id(model.token_embed.weight)}  # the tied head: not decayed
    assert rest["weight_decay"] == 0.0 and any(p.numel() == 1 for p in rest["params"])  # gates, norms, embedding
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    optimizer = torch.optim.AdamW(lm.train.parameter_groups(model, recipe), lr=recipe.lr)
    schedule = lm.train.schedule(optimizer, recipe, 100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(1e-5) and max(rates) == pytest.approx(1e-3) and rates.index(max(rates)) == 4
    assert rates[-1] == pytest.approx(1e-4, rel=0.05)  # cosine down towards lr / 10


def run_twice(settings, task_name: str, row: str, save_dir=None) -> list:
    """Two runs of a row, every value but the clock's (the first one's model saved in save_dir)."""
    from acn_kernels.experiments import lm

    runs = [lm.evaluate.run_one(settings, task_name, row, 0, save_dir if i == 0 else None) for i in range(2)]
    return [{k: v for k, v in run.items() if not any(t in k for t in TIMINGS)} for run in runs]


def test_a_language_run_is_the_same_twice_and_its_hybrid_gates_stay_clamped(tmp_path):
    measured = run_twice(quick_language(), "addition", "hybrid", str(tmp_path))
    assert measured[0] == measured[1] and "plateau exit" in measured[0] and "loss at step 40" in measured[0]
    assert torch.get_num_threads() >= 1 and not torch.are_deterministic_algorithms_enabled()  # restored
    saved = torch.load(tmp_path / "addition-hybrid-seed0.pt")
    gates = [value.item() for name, value in saved.items() if name.startswith("gates.")]
    assert gates and all(0.0 <= g <= 1.0 for g in gates) and any(g > 0 for g in gates)


def test_the_unigram_loss_and_the_plateau_exit_by_hand():
    from acn_kernels.experiments import lm

    train = torch.tensor([[1, 1, 2, -100]])
    held_out = torch.tensor([[1, 2]])
    counts = torch.ones(256)
    counts[1], counts[2] = 3.0, 2.0
    p = counts / counts.sum()
    assert lm.tasks.unigram_loss(train, held_out) == pytest.approx(-(p[1].log() + p[2].log()).item() / 2)
    task = lm.tasks.Task("t", 4, None, None, None, unigram_loss=3.0)
    assert lm.evaluate.plateau_exit([(50, 3.0), (100, 2.71), (150, 2.69)], task, 150) == 150
    assert lm.evaluate.plateau_exit([(50, 3.0)], task, 50) == 51


def trained_once(trained):
    """lm.train.trained, each (settings, task, row, seed) trained once (its runs are deterministic)."""
    models = {}

    def once(settings, *args):
        key = (repr(settings), args)
        if key not in models:
            models[key] = trained(settings, *args)
        return models[key]
    return once


@pytest.mark.slow
def test_the_speculative_bench_checks_every_row_and_reads_saved_models(tmp_path, capsys, monkeypatch):
    """bench --suite speculative: every twin, draft depth and length (each row's tokens checked against
    generate's inside depth.speculations), the same acceptance from the models paper --lm-models saved,
    and a folder of other settings' models named."""
    import csv
    import importlib.util

    from acn_kernels.experiments import lm
    from acn_kernels.tools import speculative_bench

    monkeypatch.setattr(lm.train, "trained", trained_once(lm.train.trained))  # each twin trained once here
    settings = quick_language()
    no_bar = lambda items, **_: items  # noqa: E731
    rows = speculative_bench.speculative_bench(settings, str(tmp_path / "out"), None, no_bar)
    depths, lengths = range(1, settings.depth), (2, 4, 8)
    hf = [f"llama draft {k} x4" for k in depths] if importlib.util.find_spec("transformers") else []
    twins = ("acn", "hybrid", "residual", "corpus acn b8", "corpus acn b1")
    assert list(rows) == [f"{twin} draft {k} x{n}" for twin in twins for k in depths for n in lengths] + hf
    # table 6's twins, the byte-level ACN as a batch and a prompt at a time and, with [hf], its Llama copy
    with open(tmp_path / "out" / "speculative.csv") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == len(rows) and all(r["tokens_identical"] == "True" for r in records)
    assert all(float(r["speedup"]) == pytest.approx(float(r["tokens/s"]) / float(r["plain tokens/s"]))
               for r in records if r["speedup"])
    assert "draft with a higher acceptance than the residual twin's at" in capsys.readouterr().out
    models = tmp_path / "models"
    models.mkdir()
    for twin in speculative_bench.SPECULATIVE_TWINS:
        torch.save(lm.train.trained(settings, "addition", twin, 0)[0].state_dict(), models / f"addition-{twin}-seed0.pt")
    loaded = speculative_bench.speculative_bench(settings, str(tmp_path / "again"), str(models), no_bar, quick=True)
    assert {k: v["accepted %"] for k, v in loaded.items()} == {k: v["accepted %"] for k, v in rows.items()}
    smoke = capsys.readouterr().out  # bench --quick: a smoke run of the harness, no verdict
    assert "SMOKE RUN of the harness" in smoke and "higher acceptance" not in smoke
    deeper = dataclasses.replace(settings, depth=settings.depth + 1)
    with pytest.raises(lm.ModelsDirError, match=r"addition-acn-seed0.pt holds a model of other settings"):
        speculative_bench.speculative_bench(deeper, str(tmp_path / "x"), str(models), no_bar)


def test_table_6c_is_the_same_twice_where_layer_dropout_and_the_exit_curriculum_draw():
    """The layer-dropout coins and the curriculum's exits follow the run's seed, so the table repeats."""
    measured = run_twice(quick_language(), "corpus", "anneal+layerskip")
    assert measured[0] == measured[1] and "draft 2 accepted %" in measured[0]


def test_table_6c_rows_train_as_their_methods_say():
    """The annealed row ends an ACN outright (as_acn), the LayerSkip row trains with layer dropout and
    ends without it, and an equal-time budget gives a row that costs twice the acn's step half its steps."""
    from acn_kernels.experiments import lm

    settings = quick_language()
    annealed, curve = lm.train.trained(settings, "addition", "anneal", 0)
    assert annealed.connectivity == "acn" and annealed.gates is None and len(curve) == 4
    layerskip, _ = lm.train.trained(settings, "addition", "residual+layerskip", 0)
    assert layerskip.layer_dropout is None and layerskip.connectivity == "residual"
    annealed_layerskip, _ = lm.train.trained(settings, "addition", "anneal+layerskip", 0)  # per batch, then an ACN
    assert annealed_layerskip.connectivity == "acn" and annealed_layerskip.long_connections.layer_dropout is None
    times = {("corpus", "acn"): 0.1, ("corpus", "acn+ee"): 0.2, ("corpus", "residual"): 0.1}
    assert lm.run.equal_time_steps(settings, times) == {("corpus", "acn+ee"): 20}
