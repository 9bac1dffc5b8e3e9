"""compress on a trained digits model: the depth it keeps, the parameters and latencies it reports,
and the truncated model it returns."""
import functools

import pytest
import torch
from torch import nn

from acn_kernels import GPT, MLP, compress
from acn_kernels.depth import IGNORE_INDEX, depth_scores
from acn_kernels.experiments.data import load_digits_split
from acn_kernels.experiments.demo import train


@pytest.fixture
def trained():
    return trained_model()


@functools.cache
def trained_model():
    """Trained once in a process: the tests that use it are one xdist group, so one worker trains it."""
    train_x, train_y, test_x, test_y = load_digits_split(0)
    torch.manual_seed(0)
    model = MLP(64, 64, 6, 10, connectivity="acn", backend="reference")  # compress, not the kernels, is tested
    train(model, train_x.flatten(1), train_y, epochs=8, generator=torch.Generator().manual_seed(0))
    return model, test_x.flatten(1), test_y


@pytest.mark.xdist_group("trained_digits_mlp")  # the module's trained model: one worker trains it once
def test_compress_keeps_the_smallest_depth_within_tolerance(trained):
    model, inputs, targets = trained
    report = compress(model, inputs, targets, tolerance=1.0, repeats=5)
    best = max(report.scores)
    assert report.metric == "accuracy" and len(report.scores) == 7 and best > 80
    assert report.scores[report.depth] >= best - 1.0
    assert all(a < best - 1.0 for a in report.scores[:report.depth])
    assert report.model.depth == report.depth < 6
    assert report.parameters[1] < report.parameters[0]
    assert all(ms > 0 for ms in report.latency_ms) and report.speedup > 0
    with torch.no_grad():  # the kept model is the probe's depth, parameters shared
        torch.testing.assert_close(report.model(inputs), model.probe(inputs)[report.depth])
    assert f"depth {report.depth} of 6" in str(report) and "latency" in str(report)
    assert model.training  # compress leaves the model's mode as it found it


@pytest.mark.xdist_group("trained_digits_mlp")
def test_compress_explains_what_it_needs(trained):
    model, inputs, targets = trained
    with pytest.raises(TypeError, match=r"model must have probe\(\)"):
        compress(nn.Linear(64, 10), inputs, targets)
    with pytest.raises(ValueError, match=r"tolerance must be a number >= 0 \(points of accuracy, or percent of the "
                                         r"best loss\), got -1"):
        compress(model, inputs, targets, tolerance=-1)
    with pytest.raises(ValueError, match=r"inputs and targets must be non-empty and of one length, got 450 and 3"):
        compress(model, inputs, targets[:3])


def test_compress_a_language_model_by_next_token_loss_and_generation_speed():
    torch.manual_seed(0)
    model = GPT(29, 16, 32, 4, 4, backend="reference")
    inputs = torch.randint(0, 29, (6, 12))
    report = compress(model, inputs, inputs, tolerance=5.0, metric="loss", repeats=2, generate_tokens=4)
    best = min(report.scores)
    assert len(report.scores) == 5 and report.scores[report.depth] <= best * 1.05
    assert all(loss > best * 1.05 for loss in report.scores[:report.depth])
    assert report.model.depth == report.depth and report.model.generate(inputs[:2, :3], 2).shape == (2, 5)
    assert all(speed > 0 for speed in report.tokens_per_second) and "tokens/s" in str(report)


def test_ignored_targets_count_in_no_score():
    torch.manual_seed(0)
    model = GPT(29, 16, 32, 2, 4, backend="reference")
    inputs, targets = torch.randint(0, 29, (4, 9)), torch.randint(0, 29, (4, 9))
    padded = targets.clone()
    padded[:, 5:] = IGNORE_INDEX
    for metric in ("accuracy", "loss"):
        torch.testing.assert_close(torch.tensor(depth_scores(model, inputs, padded, metric)),
                                   torch.tensor(depth_scores(model, inputs[:, :5], targets[:, :5], metric)))


@pytest.mark.parametrize("targets, error, match", [
    (lambda: torch.full((16,), 7), ValueError, r"targets must be class indices in \[0, 4\).*got values in \[7, 7\]"),
    (lambda: torch.rand(16), TypeError, "targets must be an integer tensor of class indices, got torch.float32"),
])
def test_compress_refuses_targets_that_are_not_the_models_classes(targets, error, match):
    from acn_kernels import MLP, compress
    model = MLP(6, 16, 3, 4, backend="reference")
    with pytest.raises(error, match=match):
        compress(model, torch.randn(16, 6), targets())


def test_compress_refuses_zero_repeats():
    from acn_kernels import MLP, compress
    with pytest.raises(ValueError, match="repeats"):
        compress(MLP(6, 16, 3, 4, backend="reference"), torch.randn(16, 6), torch.randint(0, 4, (16,)), repeats=0)


def test_a_language_models_targets_are_its_labels_shifted_inside():
    """Hugging Face's convention (labels = the input ids) at every LM entry point: depth k's score is
    its logits at t against the ids at t + 1, never the model copying its input."""
    from acn_kernels import early_exit_sweep
    torch.manual_seed(0)
    model = GPT(29, 16, 32, 3, 4, backend="reference").eval()
    ids = torch.randint(0, 29, (5, 11))
    labels = ids.clone()
    labels[:2, :4] = IGNORE_INDEX  # a prompt that counts in no score
    with torch.no_grad():
        logits = model.probe(ids)[:, :, :-1]
    expected = [nn.functional.cross_entropy(depth.flatten(0, 1).double(), labels[:, 1:].flatten(),
                                            ignore_index=IGNORE_INDEX).item() for depth in logits]
    # the losses through depth_cross_entropy: a float32 mean, no logits kept
    assert depth_scores(model, ids, labels, "loss") == pytest.approx(expected, rel=1e-6)
    assert compress(model, ids, labels, metric="loss", repeats=1).scores == pytest.approx(expected, rel=1e-6)
    assert model.probe(ids, labels=labels, output="loss").tolist() == pytest.approx(expected, rel=1e-6)
    counted = labels[:, 1:] != IGNORE_INDEX
    right = [100.0 * ((depth.argmax(-1) == labels[:, 1:]) & counted).sum().item() / counted.sum().item()
             for depth in logits]
    assert depth_scores(model, ids, labels, "accuracy") == pytest.approx(right)
    deepest = early_exit_sweep(model, ids, labels, [2.0])[0]
    assert deepest["accuracy"] == pytest.approx(right[-1]) and deepest["depth"] == 3
    # every depth's accuracy, agreement with the full depth and entropy from the same pass, no logits
    agree = [100.0 * ((depth.argmax(-1) == logits[-1].argmax(-1)) & counted).sum().item() / counted.sum().item()
             for depth in logits]
    entropy = [(torch.distributions.Categorical(logits=depth.double()).entropy() * counted).sum().item()
               / counted.sum().item() for depth in logits]
    scores, stats = depth_scores(model, ids, labels, "loss", statistics=True)
    assert scores == pytest.approx(expected, rel=1e-6) and stats == compress(model, ids, labels, metric="loss",
                                                                             repeats=1).statistics
    assert [100 * a for a in stats.accuracy] == pytest.approx(right, rel=1e-6)
    assert [100 * a for a in stats.agreement] == pytest.approx(agree, rel=1e-6) and stats.agreement[-1] == 1
    assert stats.entropy == pytest.approx(entropy, rel=1e-5)
    losses, probed = model.probe(ids, labels=labels, output="loss", statistics=True)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6) and probed.accuracy.tolist() == stats.accuracy
    with pytest.raises(ValueError, match=r"statistics=True needs metric='loss' on a causal language model, got "
                                         r"metric='accuracy' on GPT"):
        depth_scores(model, ids, labels, "accuracy", statistics=True)


@pytest.mark.parametrize("entry", ["compress", "depth_scores", "early_exit_sweep", "ShrinkOnCompression"])
def test_next_tokens_already_shifted_are_refused_not_scored(entry):
    import acn_kernels
    from acn_kernels import depth
    model = GPT(29, 16, 32, 2, 4, backend="reference")
    ids = torch.randint(0, 29, (4, 10))
    call = getattr(acn_kernels, entry, None) or getattr(depth, entry)
    with pytest.raises(ValueError, match=r"must be the model's labels .*got the next tokens already shifted "
                                         r"\(targets\[:, t\] == input_ids\[:, t \+ 1\]\): pass the input ids"):
        call(model, ids[:, :-1], ids[:, 1:], *([[0.5]] if entry == "early_exit_sweep" else []))
    with pytest.raises(ValueError, match=r"must be the model's labels, of input_ids' shape \(4, 10\) .* got dtype torch.int64 and shape \(4, 9\)"):
        call(model, ids, ids[:, 1:], *([[0.5]] if entry == "early_exit_sweep" else []))


def test_a_compression_that_keeps_the_full_depth_says_unchanged_not_a_speedup():
    torch.manual_seed(0)
    model = GPT(29, 16, 32, 2, 4, backend="reference")
    ids = torch.randint(0, 29, (4, 10))
    report = compress(model, ids, ids, metric="loss", tolerance=0.0, repeats=2, generate_tokens=2)
    report.depth, report.model = 2, model  # as if the full depth were the best
    text = str(report)
    assert "unchanged (the model's own depth): parameters" in text and "->" not in text.split("lossless")[0]
    assert "x)" not in text.split("lossless")[0]
