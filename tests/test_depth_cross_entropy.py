"""depth_cross_entropy (every exit's loss through one norm and head, by chunks of rows) against the
float64 reference, which materializes every logit: forward and every gradient, odd vocabularies and
widths, 1 to 13 exits, ignored targets, every option and their combinations, every dtype,
non-contiguous states, chunks smaller and larger than the rows, NaN-poisoned outputs, compile, and
bad input named."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from acn_kernels import depth_cross_entropy, reference
from acn_kernels.ops.depth_cross_entropy import depth_cross_entropy_chunked
from op_harness import DEVICE, FP32_RTOL, DTYPES
from acn_kernels.tools.agreement import compare_op, run
from acn_kernels.tools.cases import depth_loss

OPTIONS = [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(softcap=4.0), dict(norm="rmsnorm"),
           dict(label_smoothing=0.2, z_loss=1e-2, softcap=2.5, norm="rmsnorm")]


def inputs(exits=3, lead=(2, 5), dim=24, vocab=37, dtype=torch.float32, ignored=0.25, norm="layernorm",
           head_bias=True):
    """(states, targets, norm weight, norm bias, head weight, weights, head bias): unit-scale draws,
    about `ignored` of the targets ignore_index."""
    states = torch.randn(exits, *lead, dim, device=DEVICE).to(dtype)
    targets = torch.randint(0, vocab, lead, device=DEVICE)
    targets[torch.rand(lead, device=DEVICE) < ignored] = -100
    norm_weight = (1 + 0.1 * torch.randn(dim, device=DEVICE)).to(dtype)
    norm_bias = (0.1 * torch.randn(dim, device=DEVICE)).to(dtype) if norm == "layernorm" else None
    head = (torch.randn(vocab, dim, device=DEVICE) / dim ** 0.5).to(dtype)
    weights = torch.rand(exits, device=DEVICE) + 0.1
    bias = (0.1 * torch.randn(vocab, device=DEVICE)).to(dtype) if head_bias else None
    return states, targets, norm_weight, norm_bias, head, weights, bias


ROW_WORK = ["chunked", "triton"]  # the row work in PyTorch, or the Triton kernel (interpreted on a CPU)


def assert_agrees(args, dtype, chunk_rows=None, backend="triton", **options):
    fused = depth_loss(depth_cross_entropy, chunk_rows=chunk_rows, backend=backend, **options)
    problems, _, grads = compare_op(fused, depth_loss(reference.depth_cross_entropy, **options), args, dtype, FP32_RTOL)
    assert not problems, "; ".join(problems)
    return grads


@pytest.mark.parametrize("backend", ROW_WORK)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_option_and_dtype_agrees_with_the_reference_forward_and_backward(options, dtype, backend):
    args = inputs(dtype=dtype, norm=options.get("norm", "layernorm"))
    assert_agrees(args, dtype, chunk_rows=7, backend=backend, **options)  # 30 rows an exit, 90 in all


@pytest.mark.parametrize("backend", ROW_WORK)
@pytest.mark.parametrize("vocab, dim, exits", [(1, 8, 1), (7, 5, 2), (50257, 16, 2), (129, 33, 13), (2049, 4, 1)])
def test_odd_vocabularies_widths_and_exit_counts(vocab, dim, exits, backend):
    """2049: the row kernel's tiles (1024) and one more logit."""
    args = inputs(exits=exits, lead=(3,), dim=dim, vocab=vocab)
    assert_agrees(args, torch.float32, chunk_rows=4, backend=backend, softcap=30.0 if vocab > 1000 else None)


@pytest.mark.parametrize("backend", ROW_WORK)
@pytest.mark.parametrize("chunk_rows", [1, 5, 6, 1000, None])
def test_chunks_smaller_and_larger_than_the_rows(chunk_rows, backend):
    args = inputs(exits=2, lead=(3,), vocab=11)
    assert_agrees(args, torch.float32, chunk_rows=chunk_rows, backend=backend)


@pytest.mark.parametrize("backend", ROW_WORK)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_exit", ("targets", "norms", "targets and norms"))
def test_per_exit_targets_and_norms_as_multi_token_prediction_uses_them(per_exit, dtype, backend):
    """Exit e predicting the token e + 1 ahead through the shared head (per-exit targets, each with its own
    ignored rows and count), each exit with its own final norm (DeepSeek-V3's MTP modules)."""
    states, targets, nw, nb, head, weights, bias = inputs(exits=3, dtype=dtype)
    if "targets" in per_exit:
        targets = torch.stack([targets.roll(-e, -1) for e in range(3)])
        targets[1, 0] = -100
    if "norms" in per_exit:
        nw, nb = (p + 0.1 * torch.randn(3, p.shape[0], device=DEVICE).to(dtype) for p in (nw, nb))
    assert_agrees((states, targets, nw, nb, head, weights, bias), dtype, chunk_rows=7, backend=backend,
                  label_smoothing=0.1)


@pytest.mark.parametrize("backend", ROW_WORK)
@pytest.mark.parametrize("options", OPTIONS[:1] + OPTIONS[-1:], ids=("plain", "every option"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_split_row_pass_that_statistics_take_agrees_with_the_reference(options, dtype, backend):
    """statistics=True runs the split pass (the statistics kernel, then the gradient kernel), the path a
    tensor-parallel group takes: its loss and gradients against the reference, and its statistics."""
    args = inputs(dtype=dtype, norm=options.get("norm", "layernorm"))
    assert_agrees(args, dtype, chunk_rows=7, backend=backend, statistics=True, **options)
    states, targets, nw, nb, head, weights, bias = (a.double() if a is not None and a.is_floating_point() else a
                                                    for a in args)
    exact = reference.depth_cross_entropy(states, targets, nw, nb, head, weights=weights, head_bias=bias,
                                          statistics=True, **options)[2]
    ours = depth_cross_entropy(*args[:5], weights=args[5], head_bias=args[6], statistics=True, backend=backend,
                               chunk_rows=7, **options)[2]
    assert all(value.dtype == torch.float32 and value.shape == (3,) for value in ours)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05  # a 16-bit input may move an argmax past a near-tie
    for name, value, expected in zip(ours._fields, ours, exact):
        torch.testing.assert_close(value.double(), expected.double(), rtol=tolerance, atol=tolerance, msg=name)


def test_the_references_statistics_by_hand():
    """Accuracy, agreement with the last exit and entropy over the counted rows, from every logit; a tie
    goes to the lower index, as torch.argmax."""
    states, targets, nw, nb, head, weights, bias = inputs(exits=2, lead=(6,), vocab=5)
    head[3] = head[1]  # logits 1 and 3 tie in every row: argmax picks 1 where they are the largest
    bias[3] = bias[1]
    targets[0], targets[1] = -100, 3
    logits = torch.nn.functional.linear(torch.nn.functional.layer_norm(states, (24,), nw, nb), head, bias)
    stats = reference.depth_cross_entropy(states, targets, nw, nb, head, weights=weights, head_bias=bias,
                                          statistics=True)[2]
    counted = targets != -100
    argmax = [[max(range(5), key=lambda j, row=row: (row[j].item(), -j)) for row in exit] for exit in logits]
    assert 3 not in sum(argmax, [])
    for e in range(2):
        hits = [argmax[e][n] == targets[n].item() for n in range(6) if counted[n]]
        agree = [argmax[e][n] == argmax[1][n] for n in range(6) if counted[n]]
        p = logits[e].softmax(-1)
        entropy = (-(p * p.log()).sum(-1))[counted].mean()
        assert stats.accuracy[e].item() == pytest.approx(sum(hits) / len(hits))
        assert stats.agreement[e].item() == pytest.approx(sum(agree) / len(agree))
        assert stats.entropy[e].item() == pytest.approx(entropy.item(), rel=1e-5)


def test_non_contiguous_states_and_head():
    states, targets, nw, nb, head, weights, bias = inputs(exits=2, lead=(4, 3), dim=16)
    states = states.transpose(1, 2).contiguous().transpose(1, 2)  # lead dims strided
    head = torch.randn(16, head.shape[0], device=DEVICE).t()       # a transposed head, as a tied one may be
    assert not states.is_contiguous() and not head.is_contiguous()
    assert_agrees((states, targets, nw, nb, head, weights, bias), torch.float32, chunk_rows=5)


def test_per_exit_is_each_exits_mean_loss_detached():
    states, targets, nw, nb, head, weights, bias = inputs(exits=4)
    states.requires_grad_()
    loss, per_exit = depth_cross_entropy(states, targets, nw, nb, head, weights=weights, head_bias=bias)
    exact = reference.depth_cross_entropy(states.double(), targets, nw.double(), nb.double(), head.double(),
                                          weights=weights.double(), head_bias=bias.double())[1]
    assert per_exit.dtype == torch.float32 and not per_exit.requires_grad and per_exit.shape == (4,)
    torch.testing.assert_close(per_exit.double(), exact.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), (weights.double() * exact).sum(), rtol=1e-5, atol=1e-6)
    uniform = depth_cross_entropy(states, targets, nw, nb, head, head_bias=bias)[0]  # default: 1/E each
    torch.testing.assert_close(uniform, per_exit.mean(), rtol=1e-6, atol=1e-6)


def test_all_targets_ignored_give_zero_loss_and_zero_gradients_not_nan():
    states, targets, nw, nb, head, weights, bias = inputs()
    leaves = [t.requires_grad_() for t in (states, nw, nb, head, bias)]
    loss, per_exit = depth_cross_entropy(states, torch.full_like(targets, -100), nw, nb, head, weights=weights,
                                         head_bias=bias)
    loss.backward()
    assert loss.item() == 0 and not per_exit.any()
    assert all(leaf.grad is not None and not leaf.grad.any() for leaf in leaves)


def test_gradients_are_bitwise_the_same_on_a_rerun():
    args = inputs(exits=3, vocab=101)
    fused = depth_loss(depth_cross_entropy, chunk_rows=8)
    outputs, first, out_grads = run(fused, args)
    again = run(fused, args, out_grads)
    assert torch.equal(outputs[0], again[0][0]) and all(torch.equal(a, b) for a, b in zip(first, again[1]) if a is not None)


def test_a_second_backward_through_the_same_graph_is_refused_not_wrong():
    """backward scales the gradients forward computed in place (no second copy at the peak)."""
    states, targets, nw, nb, head, weights, bias = inputs()
    loss, _ = depth_cross_entropy(states.requires_grad_(), targets, nw, nb, head, weights=weights, head_bias=bias)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_without_gradients_nothing_of_the_backward_is_computed():
    states, targets, nw, nb, head, weights, bias = inputs()
    outputs = depth_cross_entropy_chunked(states, targets, nw, nb, head, bias, weights, -100, 0.0, 0.0, 0.0, True,
                                          1e-5, 16, False, "", head.shape[0], 0, False, False, "triton")
    assert all(g.numel() == 0 for g in outputs[2:])  # no statistics, no dstates, no head gradient
    states.requires_grad_()
    with torch.no_grad():
        loss, _ = depth_cross_entropy(states, targets, nw, nb, head, weights=weights, head_bias=bias)
    assert not loss.requires_grad


def test_unwritten_gradient_rows_would_show_as_nan(monkeypatch):
    monkeypatch.setenv("ACN_KERNELS_POISON", "1")
    args = inputs(exits=2, lead=(7,), vocab=13)
    assert_agrees(args, torch.float32, chunk_rows=3)  # dstates is NaN-filled before the chunks write it


def test_compiles_without_graph_breaks():
    states, targets, nw, nb, head, weights, bias = inputs(exits=2, lead=(3,), vocab=19)
    states.requires_grad_()

    def step(states):
        return depth_cross_entropy(states, targets, nw, nb, head, weights=weights, head_bias=bias, softcap=3.0)[0]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss, compiled_loss = step(states), compiled(states)
    torch.testing.assert_close(compiled_loss, eager_loss)
    eager_grad, = torch.autograd.grad(eager_loss, states)
    compiled_grad, = torch.autograd.grad(compiled_loss, states)
    torch.testing.assert_close(compiled_grad, eager_grad)


@settings(max_examples=25)
@given(exits=st.integers(1, 13), rows=st.integers(1, 9), dim=st.integers(1, 40), vocab=st.integers(1, 300),
       chunk_rows=st.integers(1, 64), options=st.sampled_from(OPTIONS), head_bias=st.booleans(),
       ignored=st.sampled_from([0.0, 0.5, 1.0]))
def test_randomized_shapes_and_options(exits, rows, dim, vocab, chunk_rows, options, head_bias, ignored):
    args = inputs(exits=exits, lead=(rows,), dim=dim, vocab=vocab, ignored=ignored,
                  norm=options.get("norm", "layernorm"), head_bias=head_bias)
    assert_agrees(args, torch.float32, chunk_rows=chunk_rows, **options)


BAD = [
    (lambda a: {**a, "states": a["states"][:, 0, 0, 0]}, r"states must have shape \(exits >= 1, \.\.\., D >= 1\), "
     r"got \(3,\)"),
    (lambda a: {**a, "states": a["states"][..., :0], "norm_weight": a["norm_weight"][:0],
                "norm_bias": a["norm_bias"][:0], "head_weight": a["head_weight"][:, :0]},
     r"states must have shape \(exits >= 1, \.\.\., D >= 1\), got \(3, 2, 5, 0\)"),
    (lambda a: {**a, "targets": a["targets"][:, :3]}, r"targets must be an integer tensor of shape \(2, 5\) "
     r"\(states' shape without the exits and the width: every exit's\) or \(3, 2, 5\) \(one an exit\), got dtype "
     r"torch.int64 and shape \(2, 3\)"),
    (lambda a: {**a, "targets": a["targets"].expand(4, 2, 5)}, r"targets must be an integer tensor of shape \(2, 5\) "
     r".* or \(3, 2, 5\) \(one an exit\), got dtype torch.int64 and shape \(4, 2, 5\)"),
    (lambda a: {**a, "norm_weight": a["norm_weight"].expand(2, 24)}, r"norm_weight must have shape \(24,\) or "
     r"\(3, 24\) \(states' width, or one an exit\), got \(2, 24\)"),
    (lambda a: {**a, "vocab_size": 38}, r"vocab_size must be an integer in \[1, 37\] \(head_weight's rows"),
    (lambda a: {**a, "sequence_parallel": True}, r"sequence_parallel=True needs tp_group"),
    (lambda a: {**a, "targets": a["targets"].float()}, r"targets must be an integer tensor .*got dtype torch.float32"),
    (lambda a: {**a, "targets": a["targets"].clamp(min=0) + 40}, r"targets must be in \[0, 37\) \(the vocabulary\) "
     r"or ignore_index=-100, got values in"),
    (lambda a: {**a, "weights": a["weights"][:2]}, r"weights must be a floating-point tensor of shape \(3,\) \(one per "
     r"exit of states, \(3, 2, 5, 24\)\), got dtype torch.float32 and shape \(2,\)"),
    (lambda a: {**a, "weights": -a["weights"]}, r"weights must be finite and >= 0, got"),
    (lambda a: {**a, "head_weight": a["head_weight"][:, :7]}, r"head_weight must have shape \(vocabulary rows, 24\) "
     r"\(states' width\), got \(37, 7\)"),
    (lambda a: {**a, "softcap": 0.0}, r"softcap must be None or a positive finite real number, got 0.0"),
    (lambda a: {**a, "softcap": -1.0}, r"softcap must be None or a positive real number"),
    (lambda a: {**a, "label_smoothing": 1.0}, r"label_smoothing must be a real number in \[0, 1\), got 1.0"),
    (lambda a: {**a, "z_loss": -0.1}, r"z_loss must be a real number >= 0"),
    (lambda a: {**a, "norm": "batchnorm"}, r"norm must be one of"),
    (lambda a: {**a, "head_bias": a["head_bias"][:3]}, r"head_bias must have shape \(37,\) \(head_weight's rows\), got \(3,\)"),
    (lambda a: {**a, "backend": "fused"}, r"backend must be one of \('auto', 'reference', 'chunked', 'triton', "
     r"'cublas', 'cuda'\), got 'fused'"),
    (lambda a: {**a, "chunk_rows": 0}, r"chunk_rows must be None or an integer >= 1, got 0"),
]


@pytest.mark.parametrize("spoil, match", BAD)
def test_bad_input_is_named_with_the_expected_and_the_actual_value(spoil, match):
    states, targets, nw, nb, head, weights, bias = inputs()
    arguments = dict(states=states, targets=targets, norm_weight=nw, norm_bias=nb, head_weight=head, weights=weights,
                     head_bias=bias)
    with pytest.raises(ValueError, match=match):
        depth_cross_entropy(**spoil(arguments))


@pytest.mark.parametrize("backend", ("auto", *ROW_WORK))
def test_a_gradient_of_the_gradient_is_refused_by_name_and_right_on_the_reference(backend):
    """The chunked path computes the gradients in forward, as numbers: a penalty on them
    (create_graph=True) would train on a silently wrong .grad, so it is refused."""
    states, targets, nw, nb, head, weights, bias = inputs()
    states.requires_grad_()
    loss, _ = depth_cross_entropy(states, targets, nw, nb, head, weights=weights, head_bias=bias, backend=backend)
    with pytest.raises(RuntimeError, match=r"^depth_cross_entropy: the gradient of its gradient \(create_graph=True\)"):
        torch.autograd.grad(loss, states, create_graph=True)
    exact = states.detach().double().requires_grad_()
    loss, _ = depth_cross_entropy(exact, targets, nw.double(), nb.double(), head.double(), weights=weights,
                                  head_bias=bias.double(), backend="reference")
    (grad,) = torch.autograd.grad(loss, exact, create_graph=True)
    assert torch.autograd.grad(grad.square().sum(), exact)[0].abs().sum() > 0


@pytest.mark.parametrize("backend", ROW_WORK)
@pytest.mark.parametrize("ignore_index", (-1, 0, 5, 36, 37, 99, -(2 ** 40)))
def test_ignore_index_may_be_any_integer_as_in_pytorch(ignore_index, backend):
    """Out of the vocabulary too (PyTorch's cross-entropy takes any): those rows count in nothing."""
    states, targets, nw, nb, head, weights, bias = inputs(ignored=0.0)
    targets[0, :2] = ignore_index
    logits = torch.randn(10, 37)  # PyTorch's own: those rows left out
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, targets.flatten(), ignore_index=ignore_index),
                               torch.nn.functional.cross_entropy(logits[2:], targets.flatten()[2:]))
    assert_agrees((states, targets, nw, nb, head, weights, bias), torch.float32, chunk_rows=4, backend=backend,
                  ignore_index=ignore_index)


@pytest.mark.parametrize("dtype", (torch.uint8, torch.int8, torch.int16, torch.int32))
def test_every_integer_target_dtype_gives_the_int64_targets_loss(dtype):
    states, targets, nw, nb, head, weights, bias = inputs(ignored=0.0)
    expected = depth_cross_entropy(states, targets, nw, nb, head, weights=weights, head_bias=bias)[1]
    got = depth_cross_entropy(states, targets.to(dtype), nw, nb, head, weights=weights, head_bias=bias)[1]
    assert torch.equal(got, expected)


def float32_errors(loss_of, args) -> list:
    """Each of the loss's and its gradients' largest error relative to its largest float64 value, of a
    float32 computation (loss_of) against the float64 reference."""
    def values(fn, dtype):
        inputs = [a.to(dtype).requires_grad_() if a is not None and a.is_floating_point() and i != 5 else a
                  for i, a in enumerate(args)]
        loss = fn(inputs)
        return [loss.detach(), *torch.autograd.grad(loss, [inputs[i] for i in (0, 2, 3, 4, 6)])]
    reference_loss = depth_loss(reference.depth_cross_entropy)
    exact = values(lambda a: reference_loss(*a[:5], a[5].double(), a[6]), torch.float64)
    return [((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
            for got, want in zip(values(lambda a: loss_of(*a), torch.float32), exact)]


@pytest.mark.parametrize("backend", ROW_WORK)
@pytest.mark.parametrize("case", ("vocabulary 1 with z_loss", "chunk_rows 1", "chunk_rows 3", "default chunks"))
def test_float32_is_within_twice_eagers_error(case, backend):
    """Against float64: the loss and every gradient at most twice eager PyTorch's float32 error (the
    reference in float32), where the gradient p (1 + 2 z lse) - 1 would cancel (a vocabulary of one)
    and where many small chunks each add into the parameters' gradients."""
    options = dict(z_loss=1e-2) if "z_loss" in case else {}
    chunk_rows = {"chunk_rows 1": 1, "chunk_rows 3": 3}.get(case)
    args = inputs(exits=3, lead=(600,), dim=48, vocab=1 if "vocabulary" in case else 300, ignored=0.1)
    eager = float32_errors(depth_loss(reference.depth_cross_entropy, **options), args)
    ours = float32_errors(depth_loss(depth_cross_entropy, chunk_rows=chunk_rows, backend=backend, **options), args)
    names = ("loss", "states", "norm weight", "norm bias", "head weight", "head bias")
    assert all(o <= 2 * e + 1e-9 for o, e in zip(ours, eager)), [
        f"{n}: {o:.1e} against eager's {e:.1e}" for n, o, e in zip(names, ours, eager)]


def test_the_loss_bench_measures_every_path_in_its_own_process(tmp_path, capsys):
    """bench --suite loss --quick: the reference and the chunked path (each in a process of its own),
    the same loss, a peak and a time each, and loss.csv."""
    from acn_kernels.tools.loss_bench import run_loss_bench

    rows = run_loss_bench(True, str(tmp_path))
    assert [row["path"] for row in rows][:2] == ["reference", "chunked"]  # then the GPT-2 probe's, with transformers
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)
    assert all(row["peak_gib"] > 0 and row["seconds"] > 0 for row in rows)
    assert "SMOKE RUN" in capsys.readouterr().out and (tmp_path / "loss.csv").exists()
    tensor_parallel = {row["way"]: row for row in rows if row["path"].startswith("tp ")}
    ours, theirs = tensor_parallel["depth_cross_entropy"], tensor_parallel["per-exit Megatron"]
    assert ours["collectives"] == 2 * ours["chunks"] + 1 and theirs["collectives"] == 4 * 13  # 13 exits


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors")
def test_the_cuda_backend_names_what_it_needs_on_cpu_tensors():
    states, targets, nw, nb, head, weights, bias = inputs()
    with pytest.raises((RuntimeError, ValueError), match=r"backend='cuda' needs (the CUDA extension|CUDA tensors)"):
        depth_cross_entropy(states, targets, nw, nb, head, weights=weights, head_bias=bias, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_on_a_gpu_the_compiled_row_kernels_agree_at_gpt2s_vocabulary(dtype, backend):
    """The row kernels compiled for the GPU (Triton's, not interpreted, and the CUDA extension's), at
    GPT-2's vocabulary (odd: the scalar path) and one of 50260 (the packs), width 768, cuBLAS's GEMMs
    around them, against the float64 reference."""
    for vocab in (50257, 50260):
        args = inputs(exits=3, lead=(2, 32), dim=768, vocab=vocab, dtype=dtype)
        assert_agrees(args, dtype, backend=backend, softcap=30.0, z_loss=1e-4)


def test_under_autocast_16_bit_states_and_a_float32_head_give_float32_logits_and_their_own_gradients():
    states, targets, nw, nb, head, weights, bias = inputs(dtype=torch.float32)
    states = states.to(torch.bfloat16).requires_grad_()
    head.requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, _ = depth_cross_entropy(states, targets, nw, nb, head, weights=weights, head_bias=bias)
    loss.backward()
    exact = reference.depth_cross_entropy(states.double(), targets, nw.double(), nb.double(), head.double(),
                                          weights=weights.double(), head_bias=bias.double())[0]
    assert loss.dtype == torch.float32 and states.grad.dtype == torch.bfloat16 and head.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=1e-4)


def test_the_default_chunk_holds_about_the_states_logits_on_a_gpu_and_32_mib_on_a_cpu():
    from acn_kernels.ops.depth_cross_entropy import chunk_rows_for

    rows = 13 * 8192  # GPT-2: 13 exits of 8 x 1024 tokens
    assert chunk_rows_for(rows, 50257, 768, torch.device("cuda")) == 2048  # 106496 / ceil(50257 / 768), to 2^k
    assert chunk_rows_for(rows, 50257, 768, torch.device("cpu")) == (1 << 23) // 50257
    assert chunk_rows_for(3, 7, 16, torch.device("cuda")) == 4
    assert chunk_rows_for(3, 10 ** 8, 4, torch.device("cpu")) == 1
