"""ShrinkOnCompression (the active depth drops while training) and early_exit (per-sample depth at
inference), checked against what the model's own probe says."""
import logging

import pytest
import torch

from acn_kernels import LongConnections, MLP, Mixer, ShrinkOnCompression, as_acn, early_exit_sweep

LIVE = 2  # blocks LIVE.. of `silenced_acn` output zeros, so y_LIVE = ... = y_L


def silenced_acn(backend: str = "reference", depth: int = 6) -> MLP:
    """An ACN whose blocks past the first LIVE output exactly zero (gelu(0 x + 0) = 0)."""
    torch.manual_seed(0)
    model = MLP(12, 24, depth, 5, connectivity="acn", backend=backend)
    with torch.no_grad():
        for block in model.blocks[LIVE:]:
            block.linear.weight.zero_()
            block.linear.bias.zero_()
    return model


def own_labels(model, inputs):
    """Targets the full model gets right: every depth >= LIVE scores 100%, shallower ones less."""
    with torch.no_grad():
        return model(inputs).argmax(-1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_shrinking_cuts_to_the_depth_the_probes_agree_on_and_trains_only_what_it_keeps(backend, caplog):
    model = silenced_acn(backend)
    assert model.backend == backend
    inputs = torch.randn(64, 12)
    shrink = ShrinkOnCompression(model, inputs, own_labels(model, inputs), every=1, tolerance=0.0, patience=2,
                                 margin=1)
    assert shrink.depth == 6
    with caplog.at_level(logging.INFO, logger="acn_kernels.depth"):
        assert shrink.step() is None and shrink.step() is None  # a best score before the window, then the window
        event = shrink.step()
    assert event is not None and (event.step, event.previous, event.depth) == (3, 6, LIVE + 1)
    assert event.scores[LIVE:] == [100.0] * (7 - LIVE) and max(event.scores[:LIVE]) < 100.0
    assert [candidate for _, _, candidate in shrink.history] == [LIVE] * 3
    assert shrink.shrinks == [event] and "active depth 6 -> 3" in caplog.text
    assert shrink.depth == model.long_connections.depth == LIVE + 1 and model.depth == 6
    assert shrink.block_steps == 3 * 6

    kept = [p for block in model.blocks[:LIVE + 1] for p in block.parameters()]
    dropped = [p for block in model.blocks[LIVE + 1:] for p in block.parameters()]
    before = [p.detach().clone() for p in kept + dropped]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=False)  # zeroed grads would still move dropped parameters in AdamW
        torch.nn.functional.cross_entropy(model(inputs), own_labels(model, inputs).roll(1)).backward()
        optimizer.step()
        shrink.step()
    assert all(not torch.equal(p, b) for p, b in zip(kept, before))
    assert all(torch.equal(p, b) and p.grad is None and not p.requires_grad
               for p, b in zip(dropped, before[len(kept):]))
    assert shrink.block_steps == 3 * 6 + 3 * (LIVE + 1)


def test_a_shrunk_model_runs_its_first_blocks_and_its_state_dict_loads_into_the_full_model():
    model = silenced_acn()
    inputs = torch.randn(16, 12)
    model.long_connections.set_active_depth(LIVE + 1)
    full = MLP(12, 24, 6, 5, connectivity="acn")
    full.load_state_dict(model.state_dict())  # strict: the same keys
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), full.truncate(LIVE + 1)(inputs))
        torch.testing.assert_close(model.probe(inputs), full.probe(inputs)[:LIVE + 2])
        assert model.probe(inputs).shape[0] == LIVE + 2
    model.long_connections.set_active_depth(6)  # all blocks again
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), full(inputs))


def test_shrinking_waits_for_patience_and_works_on_regression_targets():
    model = silenced_acn()
    inputs = torch.randn(32, 12)
    with torch.no_grad():
        targets = model(inputs)  # float targets: the probe scores the squared error of every depth
    shrink = ShrinkOnCompression(model, inputs, targets, every=2, tolerance=0.0, patience=3, margin=0)
    events = [shrink.step() for _ in range(8)]
    assert events[:7] == [None] * 7 and events[7].depth == LIVE and events[7].step == 8
    assert [step for step, _, _ in shrink.history] == [2, 4, 6, 8]
    losses = shrink.history[0][1]  # depths >= LIVE add exact zeros: one loss, bitwise
    assert losses[LIVE:] == [losses[-1]] * (7 - LIVE) and losses[-1] < 1e-10 < min(losses[:LIVE])


def test_shrinking_waits_while_the_scores_climb_or_sit_at_chance():
    model = silenced_acn()
    inputs = torch.randn(8, 12)
    shrink = ShrinkOnCompression(model, inputs, torch.zeros(8, dtype=torch.long), every=1, tolerance=0.5,
                                 patience=2)
    climbing = [[10.0, 20.0, 20.0 + step, 20.0 + step] for step in range(6)]   # candidate 2, deepest rising
    at_chance = [[10.0, 10.0, 10.0, 10.0]] * 6                                   # candidate 0
    for probes in (climbing, at_chance):
        shrink.history, shrink.first_probe = [], 0
        for scores in probes:
            shrink.scores = lambda scores=scores: scores
            assert shrink.step() is None
    settled = [[10.0, 20.0, 30.0, 30.0], [10.0, 30.0, 29.0, 30.0], [10.0, 20.0, 29.5, 30.0]]  # candidates 2, 1, 2
    for scores in settled:
        shrink.scores = lambda scores=scores: scores
        event = shrink.step()
    assert event is not None and event.depth == 2 + 1  # the largest candidate of the window, plus the margin


def test_shrinking_a_bare_long_connections_on_its_normed_sums():
    """LongConnections itself: probe gives the normed sums, so float targets and the error of each depth."""
    torch.manual_seed(3)
    blocks = [torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()) for _ in range(5)]
    with torch.no_grad():
        for block in blocks[2:]:
            block[0].weight.zero_()
            block[0].bias.zero_()
    acn = LongConnections(blocks, final_norm=torch.nn.LayerNorm(16), backend="reference")
    x0 = torch.randn(4, 7, 16)
    with torch.no_grad():
        targets = acn(x0)
    shrink = ShrinkOnCompression(acn, x0, targets, every=1, tolerance=0.0, patience=2, margin=0)
    assert [shrink.step() for _ in range(2)] == [None, None] and shrink.step().depth == 2
    with torch.no_grad():
        torch.testing.assert_close(acn(x0), targets)
        assert acn.probe(x0).shape == (3, 4, 7, 16)


def test_a_hybrid_shrinks_and_freezes_the_gates_it_no_longer_uses():
    torch.manual_seed(0)
    model = MLP(12, 24, 6, 5, connectivity="hybrid", gate_init=0.0, long_weights=True)
    with torch.no_grad():  # gate 0 and silent blocks past LIVE: depths LIVE..6 are one sub-network
        for block in model.blocks[LIVE:]:
            block.linear.weight.zero_()
            block.linear.bias.zero_()
    inputs = torch.randn(64, 12)
    shrink = ShrinkOnCompression(model, inputs, own_labels(model, inputs), every=1, tolerance=0.0, patience=2,
                                 margin=1)
    event = [shrink.step() for _ in range(3)][-1]
    assert event is not None and event.depth == LIVE + 1 == model.long_connections.depth
    assert [g.requires_grad for g in model.gates] == [True] * LIVE + [False] * (5 - LIVE)
    assert [b.requires_grad for b in model.long_weights] == [True] * (LIVE + 1) + [False] * (5 - LIVE)
    torch.nn.functional.cross_entropy(model(inputs), own_labels(model, inputs).roll(1)).backward()
    assert all(g.grad is not None for g in model.gates[:LIVE])


def test_a_shrunk_hybrid_made_an_acn_keeps_its_depth_and_the_shrinker_keeps_shrinking_it():
    """as_acn changes the model's long connections in place: the active depth stays, and the shrinker,
    which holds them, sees the same object (a rebuilt copy ran the full depth again, frozen blocks too)."""
    torch.manual_seed(0)
    model = MLP(12, 24, 6, 5, connectivity="hybrid", gate_init=0.0, learn_gates=False, backend="reference")
    inputs = torch.randn(16, 12)
    shrink = ShrinkOnCompression(model, inputs, own_labels(model, inputs), every=1)
    shrink.drop_blocks_past(3)
    shallow = model.truncate(3)(inputs)
    as_acn(model)
    assert model.connectivity == "acn" and model.long_connections is shrink.long_connections
    assert model.long_connections.depth == shrink.depth == 3 and not model.long_connections.hybrid
    torch.testing.assert_close(model(inputs), shallow)
    shrink.drop_blocks_past(2)
    assert model.long_connections.depth == 2


def test_shrinking_explains_what_it_needs():
    inputs, targets = torch.randn(8, 12), torch.randint(0, 5, (8,))
    residual = MLP(12, 24, 4, 5, connectivity="residual")
    with pytest.raises(ValueError, match=r"only an ACN \(or a hybrid\) can shrink.* got connectivity='residual'"):
        ShrinkOnCompression(residual, inputs, targets)
    with pytest.raises(TypeError, match=r"model must have probe\(\)"):
        ShrinkOnCompression(torch.nn.Linear(12, 5), inputs, targets)
    model = silenced_acn()
    for kwargs, message in (({"every": 0}, r"every must be an integer >= 1, got 0"),
                            ({"patience": 1.5}, r"patience must be an integer >= 1, got 1.5"),
                            ({"tolerance": -1}, r"tolerance must be a number >= 0 .* got -1"),
                            ({"margin": -1}, r"margin must be an integer >= 0 .* got -1")):
        with pytest.raises(ValueError, match=message):
            ShrinkOnCompression(model, inputs, targets, **kwargs)
    with pytest.raises(ValueError, match=r"probe_inputs and probe_targets must be non-empty and of one length, "
                                         r"got 8 and 3"):
        ShrinkOnCompression(model, inputs, targets[:3])
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 4\], got 5"):
        LongConnections([torch.nn.Identity()] * 4).set_active_depth(5)


# ----------------------------------------------------------------------------- early exit

def exits_from_probe(model, inputs, threshold):
    """The per-sample loop early_exit must match: the first depth whose probe logits are confident."""
    with torch.no_grad():
        per_depth = model.probe(inputs)
    logits, used = [], []
    for sample in range(inputs.shape[0]):
        confident = [k for k in range(per_depth.shape[0])
                     if torch.softmax(per_depth[k, sample], -1).max() >= threshold]
        k = confident[0] if confident else per_depth.shape[0] - 1
        logits.append(per_depth[k, sample])
        used.append(k)
    return torch.stack(logits), torch.tensor(used)


def threshold_splitting(model, inputs, depth):
    """A threshold halfway between two middle top probabilities at `depth`: about half the samples are
    confident there, and none sits on the threshold (where rounding would decide)."""
    with torch.no_grad():
        top = torch.softmax(model.probe(inputs)[depth], -1).amax(-1).sort().values
    middle = len(top) // 2
    return (top[middle - 1] + top[middle]).item() / 2


def trained_twin(connectivity, backend="reference"):
    torch.manual_seed(1)
    model = MLP(12, 24, 5, 5, connectivity=connectivity, backend=backend)
    inputs = torch.randn(48, 12)
    targets = (inputs[:, :5] * 3).argmax(-1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model.eval(), inputs


@pytest.mark.parametrize("connectivity", ["acn", "residual", "ffn", "hybrid"])
def test_early_exit_matches_a_per_sample_loop_over_probe(connectivity):
    model, inputs = trained_twin(connectivity)
    threshold = threshold_splitting(model, inputs, 1)  # about half the samples leave at depth 1 or before
    with torch.no_grad():
        logits, used = model.early_exit(inputs, threshold)
        expected_logits, expected_used = exits_from_probe(model, inputs, threshold)
        assert len(used.unique()) > 1
        torch.testing.assert_close(used, expected_used)
        torch.testing.assert_close(logits, expected_logits)

        logits, used = model.early_exit(inputs, 0.0)
        assert used.eq(0).all()
        torch.testing.assert_close(logits, model.probe(inputs)[0])
        logits, used = model.early_exit(inputs, 1.5)
        assert used.eq(5).all()
        torch.testing.assert_close(logits, model(inputs))


def test_early_exit_computes_blocks_only_for_the_samples_still_in():
    model, inputs = trained_twin("acn")
    seen = [0] * model.depth
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: seen.__setitem__(i, seen[i] + args[0].shape[0]))
    threshold = threshold_splitting(model, inputs, 2)
    seen[:] = [0] * model.depth  # the probe above ran every block on every sample
    with torch.no_grad():
        _, used = model.early_exit(inputs, threshold)
    assert seen == [int((used > i).sum()) for i in range(model.depth)]
    assert seen[-1] < inputs.shape[0]


@pytest.mark.parametrize("name", ["mlp", "mixer"])
def test_early_exit_agrees_across_backends(name):
    def build(backend):
        if name == "mlp":
            return MLP(12, 24, 4, 5, connectivity="acn", backend=backend)
        return Mixer(6, 2, 1, 16, 3, token_dim=8, channel_dim=24, num_classes=5, backend=backend)

    torch.manual_seed(2)
    reference, fused = build("reference"), build("triton")
    fused.load_state_dict(reference.state_dict())
    inputs = torch.randn(9, 12) if name == "mlp" else torch.randn(9, 1, 6, 6)
    threshold = threshold_splitting(reference, inputs, 1)
    with torch.no_grad():
        expected_logits, expected_used = reference.early_exit(inputs, threshold)
        logits, used = fused.early_exit(inputs, threshold)
    torch.testing.assert_close(used, expected_used)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_early_exit_sweep_and_bad_thresholds():
    model, inputs = trained_twin("acn")
    targets = (inputs[:, :5] * 3).argmax(-1)
    rows = early_exit_sweep(model, inputs, targets, [0.0, 2.0])
    assert (rows[0]["depth"], rows[0]["saved"]) == (0.0, 1.0) and (rows[1]["depth"], rows[1]["saved"]) == (5.0, 0.0)
    with torch.no_grad():
        full = 100.0 * (model(inputs).argmax(-1) == targets).double().mean().item()
    assert rows[1]["accuracy"] == pytest.approx(full)
    for bad in (float("nan"), "0.5", True):
        with pytest.raises(ValueError, match=r"threshold must be a real number"):
            model.early_exit(inputs, bad)
