"""acn_kernels.training on the package's GPT: early_exit_loss against the weighted sum of the exits'
next-token losses computed by hand from `probe`, its gradients too, and LayerSkip's curricula; gate
annealing, as_acn and layer dropout. The same on acnify'd Hugging Face LMs is in test_acnify.py (CI
runs it where transformers is installed)."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from acn_kernels import GPT, MLP, early_exit_loss
from acn_kernels.training import exit_weights, exits_in


def by_hand(logits, labels, weights):
    """sum_k weights[k] CE(logits at depth k, labels shifted), depths 1..L of probe's (L+1, B, T, V)."""
    losses = torch.stack([F.cross_entropy(depth[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
                          for depth in logits[1:]])
    return (weights.to(losses.dtype) * losses).sum()


def check_against_probe(model, probe, ids, labels, rtol=1e-7, **options):
    """early_exit_loss and its gradients against the loss by hand from probe's logits."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    loss = early_exit_loss(model, ids, labels, **options)
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    depth = probe(ids).shape[0] - 1
    chosen = exits_in(depth, options.get("curriculum"), options.get("step"), options.get("total_steps"))
    weights = torch.zeros(depth)
    weights[[k - 1 for k in chosen]] = exit_weights(depth, options.get("weights", "authors"))[[k - 1 for k in chosen]]
    expected = by_hand(probe(ids), labels, weights / weights.sum())
    expected_grads = torch.autograd.grad(expected, parameters, allow_unused=True)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    for got, want in zip(grads, expected_grads):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("connectivity", ["acn", "hybrid", "residual"])
@pytest.mark.parametrize("options", [dict(), dict(weights="uniform"), dict(curriculum="rotational", step=5),
                                     dict(curriculum="gradual", step=3, total_steps=10)])
def test_the_gpts_early_exit_loss_is_the_exits_losses_by_hand(connectivity, options):
    torch.manual_seed(0)
    model = GPT(31, 16, 24, 5, 4, connectivity=connectivity, norm="rmsnorm", positions="rotary",
                backend="reference").double()
    ids = torch.randint(0, 31, (3, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    check_against_probe(model, model.probe, ids, labels, **options)


def test_the_exit_losss_statistics_are_the_trained_depths_from_their_logits():
    torch.manual_seed(0)
    model = GPT(31, 16, 24, 4, 4, backend="reference").double()
    ids = torch.randint(0, 31, (3, 9))
    loss, depths, stats = early_exit_loss(model, ids, ids, curriculum="rotational", step=1, statistics=True)
    assert depths == [1, 4] and loss == early_exit_loss(model, ids, ids, curriculum="rotational", step=1)
    with torch.no_grad():
        logits = model.probe(ids)[depths, :, :-1]
    predicted = logits.argmax(-1)
    right = (predicted == ids[:, 1:]).double().mean((1, 2))
    agree = (predicted == predicted[-1]).double().mean((1, 2))
    entropy = torch.distributions.Categorical(logits=logits).entropy().mean((1, 2))
    for got, want in zip(stats, (right, agree, entropy)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"statistics must be True or False, got 1"):
        early_exit_loss(model, ids, ids, statistics=1)


def test_curricula_keep_the_final_exit_and_bad_arguments_are_named():
    assert exits_in(8, "rotational", 1, None) == [1, 5, 8] and exits_in(8, "rotational", 4, None) == [4, 8]
    assert exits_in(8, "gradual", 0, 80) == [8] and exits_in(8, "gradual", 79, 80) == list(range(1, 9))
    assert exit_weights(4, "authors").tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    model = GPT(31, 16, 24, 2, 4, backend="reference")
    ids = torch.randint(0, 31, (2, 6))
    with pytest.raises(ValueError, match=r"labels must be the model's labels, of input_ids' shape \(2, 6\)"):
        early_exit_loss(model, ids, ids[:, 1:])
    with pytest.raises(ValueError, match=r"curriculum must be one of \('rotational', 'gradual'\), got 'random'"):
        early_exit_loss(model, ids, ids, curriculum="random", step=0)
    with pytest.raises(ValueError, match=r"step must be an integer >= 0 with a curriculum, got None"):
        early_exit_loss(model, ids, ids, curriculum="rotational")
    with pytest.raises(ValueError, match=r"weights must be 'authors', 'uniform' or a floating-point tensor of shape "
                                         r"\(2,\)"):
        early_exit_loss(model, ids, ids, weights=torch.ones(3))
    with pytest.raises(TypeError, match=r"model must offer exit_states\(\)"):
        early_exit_loss(torch.nn.Linear(2, 2), ids, ids)


# ----------------------------------------------------------------------------- gate annealing, as_acn

from acn_kernels import GateAnnealing, LayerDropout, as_acn  # noqa: E402

ANNEALED = dict(connectivity="hybrid", gate_scope="block", learn_gates=False, bias=False, positions="rotary")


def annealed_gpt(depth=3):
    torch.manual_seed(0)
    return GPT(50, 16, 32, depth, 4, backend="reference", **ANNEALED).double()


@pytest.mark.parametrize("shape, halfway", [("linear", 0.5), ("cosine", 0.5)])
def test_gate_annealing_takes_the_gates_from_1_to_0_over_its_fraction_then_holds_0(shape, halfway):
    model = annealed_gpt()
    schedule = GateAnnealing(model, total_steps=20, fraction=0.5, shape=shape)
    seen = [model.gates[0].item()]
    for _ in range(20):
        schedule.step()
        seen.append(model.gates[0].item())
    assert seen[0] == 1.0 and seen[5] == pytest.approx(halfway) and seen[10:] == [0.0] * 11
    assert all(a >= b for a, b in zip(seen, seen[1:]))
    if shape == "cosine":  # leaves 1 and reaches 0 with zero slope: its last step is smaller than linear's 0.1
        assert seen[9] - seen[10] < 0.05 and seen[0] - seen[1] < 0.05
    resumed = GateAnnealing(annealed_gpt(), total_steps=20, fraction=0.5, shape=shape)
    resumed.load_state_dict({"steps": 3})
    assert resumed.long_connections.gates[0].item() == pytest.approx(seen[3])


def test_at_gate_1_the_hybrid_is_the_residual_gpt_and_as_acn_at_gate_0_is_the_acn(tmp_path):
    model, t = annealed_gpt(), torch.randint(0, 50, (2, 9))
    GateAnnealing(model, total_steps=10)
    residual = GPT(50, 16, 32, 3, 4, backend="reference", connectivity="residual", bias=False,
                   positions="rotary").double()
    residual.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(model(t), residual(t), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"as_acn needs every gate 0 .* got 3 of 3 open: \[1.0, 1.0, 1.0\]"):
        as_acn(model)
    schedule = GateAnnealing(model, total_steps=10)
    for _ in range(3):
        schedule.step()
    probed = model.probe(t)
    assert as_acn(model) is model and model.connectivity == "acn" and model.gates is None
    assert not any(name.startswith("gates") for name in model.state_dict())
    torch.testing.assert_close(model.probe(t), probed, rtol=0, atol=0)
    acn = GPT(50, 16, 32, 3, 4, backend="reference", bias=False, positions="rotary").double()
    acn.load_state_dict(model.state_dict())  # strict: exactly an ACN's parameters
    torch.save(model, tmp_path / "acn.pt")
    reloaded = torch.load(tmp_path / "acn.pt", weights_only=False)
    assert reloaded.connectivity == "acn"
    torch.testing.assert_close(reloaded.probe(t), probed, rtol=0, atol=0)


def test_gate_annealing_and_as_acn_name_what_they_need():
    with pytest.raises(ValueError, match=r"GateAnnealing needs a hybrid with gates of its own .* got connectivity='acn'"):
        GateAnnealing(GPT(50, 16, 32, 2, 4), total_steps=10)
    with pytest.raises(ValueError, match=r"got connectivity='residual'"):
        GateAnnealing(GPT(50, 16, 32, 2, 4, connectivity="residual"), total_steps=10)
    lsn = GPT(50, 16, 32, 2, 4, connectivity="hybrid", gate_scope="block", long_weights=True, x0_weight=True,
              gates_from_long_weights=True)
    with pytest.raises(ValueError, match=r"got a hybrid whose gates are derived from the long weights"):
        GateAnnealing(lsn, total_steps=10)
    with pytest.raises(ValueError, match=r"as_acn needs a hybrid whose only scalars are its gates, got long_weights, "
                                         r"x0_weight, gates_from_long_weights"):
        as_acn(lsn)
    with pytest.raises(ValueError, match=r"fraction must be a real number in \(0, 1\]"):
        GateAnnealing(annealed_gpt(), total_steps=10, fraction=1.5)
    with pytest.raises(ValueError, match=r"shape must be one of \('linear', 'cosine'\), got 'step'"):
        GateAnnealing(annealed_gpt(), total_steps=10, shape="step")


# ----------------------------------------------------------------------------- layer dropout

def test_layer_dropout_rates_rise_with_depth_and_over_training():
    model = GPT(50, 16, 32, 5, 4, connectivity="residual")
    schedule = LayerDropout(model, total_steps=10, p_max=0.2)
    assert model.layer_dropout == [0.0] * 5  # S(0) = 0
    for _ in range(10):
        schedule.step()
    assert model.layer_dropout[0] == 0.0 and model.layer_dropout[-1] == pytest.approx(0.2)
    assert all(a < b for a, b in zip(model.layer_dropout, model.layer_dropout[1:]))
    with pytest.raises(ValueError, match=r"per='sample' skips blocks sample by sample, .* per='batch' for "
                                         r"connectivity='acn'"):
        LayerDropout(GPT(50, 16, 32, 2, 4), total_steps=10)
    with pytest.raises(ValueError, match=r"per must be one of .*, got 'token'"):
        LayerDropout(model, total_steps=10, per="token")
    with pytest.raises(TypeError, match=r"LayerDropout skips blocks of the package's models, got Linear"):
        LayerDropout(torch.nn.Linear(2, 2), total_steps=10)
    acn = GPT(50, 16, 32, 3, 4)
    LayerDropout(acn, total_steps=10, p_max=0.2, per="batch", curriculum=None)
    assert acn.long_connections.layer_dropout == acn.layer_dropout and acn.layer_dropout[-1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"rates must be one per block \(3\) and per='batch' for connectivity "
                                         r"'acn', got 3 rates per='sample'"):
        acn.set_layer_dropout([0.1] * 3)
    with pytest.raises(ValueError, match=r"rates must be one per block \(5\) .* got 2 rates per='sample'"):
        model.set_layer_dropout([0.1] * 2)


def test_a_dropped_block_passes_its_input_on_and_runs_only_the_kept_samples():
    torch.manual_seed(0)
    model = GPT(50, 16, 32, 2, 4, connectivity="residual", backend="reference").double()
    t = torch.randint(0, 50, (8, 9))
    truncated = model.truncate(1)(t)
    LayerDropout(model, total_steps=1, p_max=1.0, curriculum=None)  # block 1 at rate 1, block 0 at 0
    torch.testing.assert_close(model.train()(t), truncated, rtol=0, atol=0)
    torch.testing.assert_close(model.eval()(t), model.truncate(2)(t), rtol=0, atol=0)  # eval: no dropout
    batches = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    model.set_layer_dropout([0.0, 0.5])
    model.train()(t).sum().backward()
    assert 0 < batches[-1] < 8 or batches == []  # some samples skipped (their compute saved)


def without_depths(model, factory, dropped: set):
    """A model built by `factory(depth)` holding `model`'s parameters without the dropped depths (each
    kept depth's blocks and each kept unit's gate moved down): the network as if those depths were not
    there."""
    kept = [d for d in range(model.depth) if d not in dropped]
    long = model.long_connections
    kept_units = [u for u in range(long.units) if u // long.units_per_block in kept]
    per = long.scalars.units_per_scalar if long.hybrid else 1
    new_index = {"blocks": {d: kept.index(d) for d in kept},  # gate j is on the short path after unit j * per
                 "gates": {u // per: kept_units.index(u) // per for u in kept_units if u % per == 0}}
    moved = {}
    for name, value in model.state_dict().items():
        head, _, rest = name.partition(".")
        index, _, tail = rest.partition(".")
        if head not in new_index:
            moved[name] = value
        elif int(index) in new_index[head]:
            moved[".".join([head, str(new_index[head][int(index)]), *([tail] if tail else [])])] = value
    smaller = factory(len(kept)).to(next(model.parameters()).dtype)
    missing, unexpected = smaller.load_state_dict(moved, strict=False)
    assert not missing and all(name.startswith("gates.") for name in unexpected)  # a gate after the last unit
    return smaller, kept


LAYER_DROPOUT_MODELS = {
    "gpt": (lambda depth, **kw: GPT(50, 16, 32, depth, 4, bias=False, positions="rotary", **kw),
            lambda dtype: torch.randint(0, 50, (3, 7))),
    "mlp": (lambda depth, **kw: MLP(12, 16, depth, 5, **kw), lambda dtype: torch.randn(5, 12, dtype=dtype)),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("connectivity", ["acn", "hybrid", "residual"])
@pytest.mark.parametrize("kind", sorted(LAYER_DROPOUT_MODELS))
def test_a_dropped_depth_is_the_network_without_it_forward_and_backward(kind, connectivity, backend):
    """Per batch, every connectivity: with rates 1 (always dropped) and 0 (always kept) the training
    forward and every gradient are those of the model built without the dropped depths (an ACN's
    next kept block reads the last kept one's output, a hybrid's its gated short state), the fused
    boundaries (triton) as the reference's; the dropped depths get no gradient; eval drops nothing."""
    build, draw = LAYER_DROPOUT_MODELS[kind]
    factory = partial(build, connectivity=connectivity, backend=backend,
                      **({"learn_gates": False} if connectivity == "hybrid" else {}))
    dtype = torch.float64 if backend == "reference" else torch.float32
    model = factory(4).to(dtype)
    with torch.no_grad():
        for gate in model.gates or []:
            gate.uniform_(0.2, 0.9)
    inputs = draw(dtype)
    full = model.eval()(inputs)
    model.set_layer_dropout([0.0, 1.0, 0.0, 1.0], per="batch")
    smaller, kept = without_depths(model, factory, {1, 3})
    expected, got = smaller.train()(inputs), model.train()(inputs)
    tolerance = dict(rtol=0, atol=0) if backend == "reference" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, **tolerance)
    grad = torch.randn_like(got)
    expected.backward(grad)
    got.backward(grad)
    for name, parameter in model.named_parameters():
        head, _, rest = name.partition(".")
        index = rest.partition(".")[0]
        if head == "blocks" and int(index) not in kept:
            assert parameter.grad is None, name
        elif parameter.requires_grad:
            moved = f"blocks.{kept.index(int(index))}.{rest.partition('.')[2]}" if head == "blocks" else name
            torch.testing.assert_close(parameter.grad, smaller.get_parameter(moved).grad, **tolerance, msg=name)
    if kind == "gpt" and connectivity != "residual":  # every depth's state: a dropped depth's is the one before
        states = model.train().exit_states(inputs)[0]
        torch.testing.assert_close(states[[2, 4]], states[[1, 3]], rtol=0, atol=0)
    torch.testing.assert_close(model.eval()(inputs), full, rtol=0, atol=0)


def test_gate_annealing_made_an_acn_still_holds_the_models_long_connections():
    model = annealed_gpt()
    schedule = GateAnnealing(model, total_steps=2, fraction=0.5)
    schedule.step()
    as_acn(model)
    assert schedule.long_connections is model.long_connections and not model.long_connections.hybrid


def test_schedules_follow_the_fraction_of_training_done_for_a_budget_of_time():
    """progress= (a callable: the fraction done, from a clock say) in place of total_steps."""
    done = [0.0]
    model = annealed_gpt()
    annealing = GateAnnealing(model, fraction=0.5, progress=lambda: done[0])
    by_steps = GateAnnealing(annealed_gpt(), total_steps=8, fraction=0.5)
    for step in range(1, 9):
        done[0] = step / 8
        annealing.step()
        by_steps.step()
        assert model.gates[0].item() == pytest.approx(by_steps.long_connections.gates[0].item())
    acn = GPT(50, 16, 32, 3, 4, backend="reference")
    dropout = LayerDropout(acn, p_max=0.2, per="batch", progress=lambda: 0.5)
    assert acn.layer_dropout == dropout.rates(0.5) and dropout.rates(0.5)[-1] == pytest.approx(0.2 * (2 ** 0.5 - 1))
    assert exits_in(8, "gradual", None, progress=0.5) == exits_in(8, "gradual", 40, 80)
    with pytest.raises(ValueError, match=r"give total_steps .* or progress .*, one of them, got total_steps=None"):
        GateAnnealing(model)
    with pytest.raises(ValueError, match=r"progress\(\) must be a real number"):
        GateAnnealing(model, progress=lambda: "half")


def test_exit_weights_that_train_nothing_are_refused():
    model = GPT(31, 16, 24, 2, 4, backend="reference")
    ids = torch.randint(0, 31, (2, 6))
    with pytest.raises(ValueError, match=r"weights must be finite, >= 0 and not all 0 .*got \[0.0, 0.0\]"):
        early_exit_loss(model, ids, ids, weights=torch.zeros(2))
    with pytest.raises(ValueError, match=r"weights of the exits this step trains \(\[2\]\) must not all be 0"):
        early_exit_loss(model, ids, ids, weights=torch.tensor([1.0, 0.0]), curriculum="rotational", step=0)


def test_labels_are_named_as_labels_with_input_ids_shape():
    model = GPT(31, 16, 24, 2, 4, backend="reference")
    ids = torch.randint(0, 31, (2, 6))
    with pytest.raises(ValueError, match=r"labels must be the model's labels, of input_ids' shape \(2, 6\) .* got "
                                         r"dtype torch.float32"):
        early_exit_loss(model, ids, ids.float())
    with pytest.raises(ValueError, match=r"labels must be in \[0, 31\) \(the vocabulary\) or -100, got values in "
                                         r"\[\d+, 40\]"):
        early_exit_loss(model, ids, ids.clamp(max=30).index_fill(1, torch.tensor([0]), 40))
    with pytest.raises(ValueError, match=r"got the next tokens already shifted"):
        model.probe(ids[:, :-1], labels=ids[:, 1:], output="loss")


def test_a_readout_runs_on_the_backend_it_was_given():
    """No backend but "reference" (its chunked path: plain PyTorch, no logits) turns into another."""
    from acn_kernels.long_connections import Readout

    model = GPT(31, 16, 24, 2, 4, backend="reference")
    ids = torch.randint(0, 31, (2, 6))
    states, _ = model.exit_states(ids)
    with pytest.raises((RuntimeError, ValueError), match=r"backend='cuda' needs (the CUDA extension|CUDA tensors)"):
        Readout(model.final_norm, model.lm_head.weight, None, "cuda").losses(states, ids, ids)
