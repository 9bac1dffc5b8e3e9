"""early_exit_loss (acn_kernels.training) on the package's GPT and acnify'd Hugging Face LMs: the
weighted sum of the exits' next-token losses computed by hand from `probe`, its gradients too, and
LayerSkip's curricula."""
import pytest
import torch
import torch.nn.functional as F

from acn_kernels import GPT, early_exit_loss
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


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_acnified_lms_early_exit_loss_is_the_exits_losses_by_hand(family):
    from test_acnify import acnify, decoder

    model = acnify(decoder(family), backend="reference").double().eval()  # GPT-2's dropout off
    ids = torch.randint(1, 50, (2, 8))
    # Llama's RMSNorm computes in float32 even on float64 hidden states: its probe is that exact
    check_against_probe(model, lambda x: model.probe(input_ids=x), ids, ids, rtol=1e-5, curriculum="rotational", step=3)


def test_curricula_keep_the_final_exit_and_bad_arguments_are_named():
    assert exits_in(8, "rotational", 1, None) == [1, 5, 8] and exits_in(8, "rotational", 4, None) == [4, 8]
    assert exits_in(8, "gradual", 0, 80) == [8] and exits_in(8, "gradual", 79, 80) == list(range(1, 9))
    assert exit_weights(4, "authors").tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    model = GPT(31, 16, 24, 2, 4, backend="reference")
    ids = torch.randint(0, 31, (2, 6))
    with pytest.raises(ValueError, match=r"labels must be a tensor of input_ids' shape \(2, 6\)"):
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
