"""acnify on small timm ViT and Hugging Face BERT configurations (no weights downloaded): the output
equals a hand-written ACN loop over the same submodules (float64, eval mode), the state_dict round
trip with the unconverted model, one AdamW step trains, and probe[k] equals truncate(k)'s output.
timm and transformers come with the [timm] and [hf] extras (CI installs them beside the CUDA torch,
which torchvision needs)."""
import copy

import pytest
import torch
from torch import nn

from acn_kernels import GateAnnealing, ShrinkOnCompression, acnify, as_acn
from op_harness import FUSED_BACKENDS
from test_training import check_against_probe


def test_unsupported_models_name_the_supported_classes():
    with pytest.raises(TypeError, match=r"acnify supports timm.models.vision_transformer.VisionTransformer and "
                                        r"transformers BertModel, GPT2Model, LlamaModel .* got Linear"):
        acnify(nn.Linear(3, 3))


def one_adamw_step_trains(model, loss):
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def assert_round_trip(residual: nn.Module, converted: nn.Module, fresh_residual: nn.Module):
    assert list(converted.state_dict()) == list(residual.state_dict())
    converted.load_state_dict(residual.state_dict())     # a residual checkpoint, to fine-tune from
    fresh_residual.load_state_dict(converted.state_dict())  # and back
    for a, b in zip(fresh_residual.state_dict().values(), residual.state_dict().values()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- timm

def small_vit():
    timm = pytest.importorskip("timm", reason="needs the [timm] extra: pip install 'acn-kernels[timm]'")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=3, num_heads=3, num_classes=5, init_values=0.5, drop_path_rate=0.1)


def vit_features_by_hand(m, images):
    """The ACN of the definition over timm's own submodules (eval mode: no drop path): the final norm
    on the running sum."""
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
    total = x
    for b in m.blocks:
        x = b.ls2(b.mlp(b.norm2(b.ls1(b.attn(b.norm1(x))))))
        total = total + x
    return m.norm(total)


def vit_by_hand(m, images):
    return m.forward_head(vit_features_by_hand(m, images))


def test_timm_vit_is_the_acn_of_its_own_blocks():
    residual = small_vit().double().eval()
    model = acnify(copy.deepcopy(residual), backend="reference")
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(model(images), vit_by_hand(model, images), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(model(images), residual(images))  # the residual adds are gone
    probed = model.probe(images)
    assert probed.shape == (4, 2, 5)
    for k in range(4):
        torch.testing.assert_close(model.truncate(k)(images), probed[k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probed[-1], model(images))
    assert_round_trip(residual, model, small_vit().double())


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_timm_vit_on_a_fused_backend_trains_and_matches_the_reference(backend):
    residual = small_vit()
    reference = acnify(copy.deepcopy(residual), backend="reference").eval()
    fused = acnify(copy.deepcopy(residual), backend=backend).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fused(images), reference(images), rtol=1e-4, atol=1e-4)
    fused.train()
    one_adamw_step_trains(fused, fused(images).logsumexp(-1).mean())


def test_shrinking_an_acnified_vit_runs_its_first_blocks_and_keeps_its_state_dict():
    """ShrinkOnCompression reaches a converted model through its LongConnections."""
    residual = small_vit().eval()
    model = acnify(copy.deepcopy(residual), backend="reference").eval()
    with torch.no_grad():  # the last block outputs zeros: depths 2 and 3 are one sub-network
        for p in (model.blocks[2].mlp.fc2.weight, model.blocks[2].mlp.fc2.bias):
            p.zero_()
        images = torch.randn(16, 3, 32, 32)
        labels = model(images).argmax(-1)
    shrink = ShrinkOnCompression(model, images, labels, every=1, tolerance=0.0, patience=2, margin=0)
    events = [shrink.step() for _ in range(3)]
    assert events[:2] == [None, None] and events[2] is not None and shrink.depth <= 2
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.truncate(shrink.depth)(images))
        assert model.probe(images).shape[0] == shrink.depth + 1
    residual.load_state_dict(model.state_dict())  # every key still there
    assert not any(p.requires_grad for p in model.blocks[2].parameters())


def test_timm_vit_hybrid_is_the_gated_loop_and_adds_only_its_gates():
    residual = small_vit().double().eval()
    model = acnify(copy.deepcopy(residual), backend="reference", connectivity="hybrid", gate_init=0.4)
    with torch.no_grad():
        for g in model.gates:
            g.copy_(torch.rand(()))
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    s, total = x, x
    for i, b in enumerate(model.blocks):
        x = b.ls2(b.mlp(b.norm2(b.ls1(b.attn(b.norm1(s))))))
        total = total + x
        s = model.gates[i] * s + x if i < len(model.blocks) - 1 else s
    torch.testing.assert_close(model(images), model.forward_head(model.norm(total)), rtol=1e-12, atol=1e-12)
    assert set(model.state_dict()) - set(residual.state_dict()) == {"gates.0", "gates.1"}
    missing, unexpected = model.load_state_dict(residual.state_dict(), strict=False)
    assert sorted(missing) == ["gates.0", "gates.1"] and unexpected == []
    torch.testing.assert_close(model.truncate(2)(images), model.probe(images)[2], rtol=1e-12, atol=1e-12)
    assert list(dict(model.truncate(2).named_parameters())).count("gates.0") == 1


def test_hf_bert_hybrid_trains_its_gates():
    model = acnify(small_bert(), connectivity="hybrid", long_weights=True)
    names = [n for n, _ in model.named_parameters() if "gate" in n or "long_weight" in n]
    assert names == ["bert.encoder.gates.0", "bert.encoder.gates.1", "bert.encoder.long_weights.0",
                     "bert.encoder.long_weights.1", "bert.encoder.long_weights.2"]
    ids = torch.randint(0, 50, (2, 7))
    assert model.probe(input_ids=ids).shape == (4, 2, 3)
    one_adamw_step_trains(model, model(input_ids=ids).logits.square().mean())


def test_acnify_twice_says_so():
    model = acnify(small_vit())
    with pytest.raises(TypeError, match=r"got AcnVisionTransformer \(already converted\)"):
        acnify(model)


# ----------------------------------------------------------------------------- Hugging Face

def small_bert(cls_name="BertForSequenceClassification"):
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'acn-kernels[hf]'")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16,
                                     num_labels=2 if cls_name == "BertForQuestionAnswering" else 3)
    return getattr(transformers, cls_name)(config)


def bert_sums_by_hand(bert, ids) -> list:
    """AC-BERT's running sums y_0..y_L over a BertModel's own submodules: post-LN layers without their
    two adds, the sum from the embedding output, no final norm."""
    x = bert.embeddings(input_ids=ids)
    sums = [x]
    for layer in bert.encoder.layer:
        attention = layer.attention.self(x)[0]
        attention = layer.attention.output.LayerNorm(layer.attention.output.dense(attention))
        x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(attention)))
        sums.append(sums[-1] + x)
    return sums


def bert_by_hand(m, ids):
    """The pooler and classifier on AC-BERT's sum."""
    return m.classifier(m.bert.pooler(bert_sums_by_hand(m.bert, ids)[-1]))


def test_hf_bert_is_the_acn_of_its_own_layers():
    residual = small_bert().double().eval()
    model = acnify(copy.deepcopy(residual), backend="reference")
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(model(ids).logits, bert_by_hand(model, ids), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(model(ids).logits, residual(ids).logits)
    probed = model.probe(input_ids=ids)
    assert probed.shape == (4, 2, 3)
    for k in range(4):
        torch.testing.assert_close(model.truncate(k)(input_ids=ids).logits, probed[k], rtol=1e-12, atol=1e-12)
    assert_round_trip(residual, model, small_bert().double())
    with pytest.raises(TypeError, match="already converted"):
        acnify(model)


def test_hf_bert_model_with_a_mask_trains():
    model = acnify(small_bert("BertModel"))
    ids, mask = torch.randint(0, 50, (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    out = model(input_ids=ids, attention_mask=mask)
    assert model.probe(input_ids=ids, attention_mask=mask).shape == (4, 2, 7, 32)
    one_adamw_step_trains(model, out.last_hidden_state.square().mean() + out.pooler_output.square().mean())


# ----------------------------------------------------------------------------- Hugging Face decoders

def decoder(family: str, class_name: str | None = None, layers: int = 3, **config):
    """A small decoder (a task model, or its base model for the "-base" families, or the class named),
    eager attention so that float64 comparisons are exact."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'acn-kernels[hf]'")
    torch.manual_seed(0)
    config = {"attn_implementation": "eager", "vocab_size": 50, "pad_token_id": 0, **config}
    if family.startswith("gpt2"):
        cfg = transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=layers, n_head=4, **config)
        class_name = class_name or ("GPT2Model" if family.endswith("-base") else "GPT2LMHeadModel")
        return getattr(transformers, class_name)(cfg)
    name = {"llama": "Llama", "llama-base": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[family]
    cfg = getattr(transformers, f"{name}Config")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, **config)
    class_name = class_name or (f"{name}Model" if family.endswith("-base") else f"{name}ForCausalLM")
    return getattr(transformers, class_name)(cfg)


DECODERS = ("gpt2", "gpt2-base", "llama", "llama-base", "qwen2", "mistral")
CAUSAL_LMS = ("gpt2", "llama", "qwen2", "mistral")


def base_of(model):
    return next(m for m in (model, getattr(model, "transformer", None), getattr(model, "model", None))
                if m is not None and hasattr(m, "get_input_embeddings") and (hasattr(m, "h") or hasattr(m, "layers")))


def decoder_by_hand(model, ids, residual: bool, every_layer: bool = False, alphas=None, long_short=False,
                    skip_attention=False):
    """The model's base by hand over its own submodules: the ACN of the definition (each layer's
    attention branch, then its MLP branch on the attention output, both added to the sum from the
    embeddings, the final norm on the sum), or with the residual adds put back, the model as it was.
    every_layer: the states after 0..L-1 layers and the final norm's output, as output_hidden_states.
    alphas: the authors' H-ACN (layer i's two short paths gated by 1 - alphas[i]); with long_short,
    their Long_Short (x_0 weighted by alphas[0], layer i's branches by alphas[i + 1]); skip_attention:
    their LSN's whole attention short path (x + a)."""
    from transformers.masking_utils import create_causal_mask

    base = base_of(model)
    positions = torch.arange(ids.shape[1])[None]
    if hasattr(base, "h"):  # GPT-2
        x, layers, final = base.wte(ids) + base.wpe(positions), [(b.ln_1, b.attn, b.ln_2, b.mlp) for b in base.h], \
            base.ln_f
        keywords = {}
    else:
        x, layers, final = base.embed_tokens(ids), [(la.input_layernorm, la.self_attn, la.post_attention_layernorm,
                                                     la.mlp) for la in base.layers], base.norm
        keywords = {"position_embeddings": base.rotary_emb(x, positions)}
    keywords["attention_mask"] = create_causal_mask(config=base.config, inputs_embeds=x, attention_mask=None,
                                                    cache=None, position_ids=positions)
    states = [alphas[0] * x if long_short else x]  # after each layer: x (residual), the running sum (ACN)
    for i, (norm1, attention, norm2, mlp) in enumerate(layers):
        g = 1.0 if residual else 0.0 if alphas is None else 1 - alphas[i]
        a = attention(norm1(x), **keywords)[0]
        x = (x if skip_attention else g * x) + a
        m = mlp(norm2(x))
        x = g * x + m
        states.append(x if residual else states[-1] + (alphas[i + 1] if long_short else 1) * (a + m))
    return states[:-1] + [final(states[-1])] if every_layer else final(states[-1])


def last_hidden(model, ids, **kwargs):
    return base_of(model)(ids, **kwargs).last_hidden_state


@pytest.mark.parametrize("family", DECODERS)
def test_hf_decoder_is_the_acn_of_its_own_layers(family):
    residual = decoder(family).double().eval()
    ids = torch.randint(1, 50, (2, 9))
    torch.testing.assert_close(last_hidden(residual, ids), decoder_by_hand(residual, ids, residual=True))
    model = acnify(copy.deepcopy(residual), backend="reference")
    torch.testing.assert_close(last_hidden(model, ids), decoder_by_hand(model, ids, residual=False), rtol=1e-12,
                               atol=1e-12)
    assert not torch.allclose(last_hidden(model, ids), last_hidden(residual, ids))
    hidden = base_of(model)(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == 4 and torch.equal(hidden[-1], last_hidden(model, ids))
    probed = model.probe(input_ids=ids)
    assert probed.shape[0] == 4
    # the head over every depth's batch at once: the BLAS may block it otherwise than over one depth's
    torch.testing.assert_close(probed[-1], model(ids)[0], rtol=0, atol=1e-15)
    for k in range(4):
        torch.testing.assert_close(model.truncate(k)(input_ids=ids)[0], probed[k], rtol=1e-12, atol=1e-12)
    assert_round_trip(residual, model, decoder(family).double())
    assert [len(list(layers)) for layers in (getattr(base_of(model), "h", None) or base_of(model).layers,)] == [3]


@pytest.mark.parametrize("family", CAUSAL_LMS)
def test_hf_causal_lm_generates_as_before_with_or_without_the_cache(family):
    model = acnify(decoder(family)).eval()
    prompt = torch.randint(1, 50, (2, 4))
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(greedy, model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                              do_sample=False, use_cache=False))
    sampled = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=True, top_k=5)
    assert sampled.shape == (2, 10)
    shallow = model.truncate(1)
    assert shallow.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                            do_sample=False).shape == (2, 7)


@pytest.mark.parametrize("family", CAUSAL_LMS)
def test_hf_causal_lm_with_padding_labels_and_one_training_step(family):
    model = acnify(decoder(family, attn_implementation="sdpa")).eval()
    ids = torch.randint(1, 50, (1, 6))
    padded, mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1), torch.tensor([[0] * 3 + [1] * 6])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(model(padded, attention_mask=mask, position_ids=positions).logits[:, 3:],
                               model(ids).logits, rtol=1e-5, atol=1e-5)  # left padding changes nothing
    labels = padded.masked_fill(mask == 0, -100)
    assert model.probe(padded, attention_mask=mask, labels=labels, output="loss").shape == (4,)
    model.train()
    one_adamw_step_trains(model, model(padded, attention_mask=mask, labels=labels).loss)


def test_hf_decoder_gradient_checkpointing_gives_the_same_gradients():
    model = acnify(decoder("llama"))
    ids = torch.randint(1, 50, (2, 7))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_hf_decoder_hybrid_adds_only_its_gates_and_runs_fused():
    residual = decoder("llama")
    model = acnify(copy.deepcopy(residual), backend="triton", connectivity="hybrid", gate_init=0.25)
    assert set(model.state_dict()) - set(residual.state_dict()) == {f"model.gates.{i}" for i in range(5)}
    reference = acnify(copy.deepcopy(residual), backend="reference", connectivity="hybrid", gate_init=0.25)
    ids = torch.randint(1, 50, (2, 7))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    one_adamw_step_trains(model, model(ids, labels=ids).loss)


def test_lora_adapters_attach_to_a_converted_model_as_to_the_original():
    peft = pytest.importorskip("peft", reason="needs the [hf] extra: pip install 'acn-kernels[hf]'")
    model = peft.get_peft_model(acnify(decoder("llama")), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(1, 50, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_compress_an_acnified_causal_lm_by_loss_with_generation_speed():
    from acn_kernels import compress

    model = acnify(decoder("gpt2"))
    ids = torch.randint(1, 50, (4, 12))
    report = compress(model, ids, ids, tolerance=50.0, metric="loss", repeats=2, generate_tokens=3)
    assert len(report.scores) == 4 and report.model.generate(ids[:, :2], max_new_tokens=2).shape == (4, 4)
    assert all(speed > 0 for speed in report.tokens_per_second) and "tokens/s" in str(report)
    assert 1 <= report.speculation.draft_depth < 3 and "lossless: speculative decoding" in str(report)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_acnified_lms_depth_scores_take_its_labels_as_its_loss_does(family):
    from acn_kernels import compress
    from acn_kernels.depth import depth_scores

    model = acnify(decoder(family), backend="reference").double().eval()
    ids = torch.randint(1, 50, (4, 12))
    scores = depth_scores(model, ids, ids, "loss")
    assert scores[-1] == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-6)  # its loss: float32
    assert scores == pytest.approx(model.probe(input_ids=ids, labels=ids, output="loss").tolist(), rel=1e-6)
    losses, stats = model.probe(input_ids=ids, labels=ids, output="loss", statistics=True)
    right = (model.probe(input_ids=ids)[:, :, :-1].argmax(-1) == ids[:, 1:]).double().mean((1, 2))
    assert losses.tolist() == pytest.approx(scores, rel=1e-6) and stats.accuracy.tolist() == pytest.approx(right.tolist())
    with pytest.raises(ValueError, match=r"got the next tokens already shifted"):
        compress(model, ids[:, :-1], ids[:, 1:], metric="loss")
    base = base_of(model)
    attentions = [getattr(layer, "attn", None) or layer.self_attn for layer in (getattr(base, "h", None) or base.layers)]
    calls = []
    hooks = [a.register_forward_hook(lambda *_: calls.append(1)) for a in attentions]
    try:
        model.probe(input_ids=ids, labels=ids, output="loss")
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 3  # every depth's loss from one pass of the layers (depth_cross_entropy reads them all)


def test_decoders_whose_layers_attend_differently_are_refused():
    model = decoder("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(TypeError, match=r"whose layers all attend alike, got layer_types"):
        acnify(model)


LOAD = """
import sys, torch
if sys.argv[2] == "with":
    import acn_kernels
import transformers
expected = torch.load(sys.argv[1] + "/expected.pt")
for name in ("AutoModelFor" + sys.argv[3], sys.argv[4]):
    try:
        model = getattr(transformers, name).from_pretrained(sys.argv[1]).eval()
    except ValueError as error:
        print(name, "refused:", error)
        continue
    converted = any(hasattr(m, "long_connections") for m in model.modules())
    # attention may load as sdpa where it was saved eager: equal within float32 rounding
    same = torch.allclose(model(torch.arange(1, 9)[None])[0], expected, rtol=1e-5, atol=1e-6)
    print(name, "converted" if converted else "residual", same)
"""


@pytest.mark.parametrize("family,auto,concrete", [("llama", "CausalLM", "LlamaForCausalLM"),
                                                  ("gpt2", "CausalLM", "GPT2LMHeadModel"),
                                                  ("bert", "SequenceClassification",
                                                   "BertForSequenceClassification")])
def test_saved_acns_load_back_as_acns_and_never_silently_residual(family, auto, concrete, tmp_path):
    import subprocess
    import sys

    model = acnify(small_bert() if family == "bert" else decoder(family), connectivity="hybrid").eval()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "gates.0" in n).fill_(0.7)
    model.save_pretrained(tmp_path)
    torch.save(model(torch.arange(1, 9)[None])[0], tmp_path / "expected.pt")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    runs = {imported: subprocess.run([sys.executable, "-c", LOAD, str(tmp_path), imported, auto, concrete],
                                     capture_output=True, text=True, env=env, timeout=300)
            for imported in ("with", "without")}
    assert runs["with"].returncode == 0, runs["with"].stderr[-2000:]
    assert f"AutoModelFor{auto} converted True" in runs["with"].stdout
    assert f"{concrete} converted True" in runs["with"].stdout
    assert "You are using a model of type" not in runs["with"].stderr  # loaded right: no warning says otherwise
    alone = runs["without"].stdout + runs["without"].stderr
    hint = f"`acn_{family} (import acn_kernels to load it as an ACN)`"
    assert f"AutoModelFor{auto} refused: The checkpoint you are trying to load has model type {hint}" in alone
    assert f"model of type {hint}" in runs["without"].stderr  # the concrete class warns, naming the fix


def test_a_checkpoint_of_the_earlier_acn_model_type_still_loads_as_an_acn(tmp_path):
    import json

    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'acn-kernels[hf]'")
    model = acnify(small_bert(), backend="reference").double().eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "acn_bert"  # what acn_kernels wrote before the type named the fix
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).double().eval()
    from acn_kernels.long_connections import owner_of
    owner_of(loaded)[1].long_connections.backend = "reference"
    ids = torch.randint(1, 50, (2, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("connectivity", ["acn", "hybrid"])
def test_a_truncated_conversion_saves_its_depth_and_reloads_to_the_same_outputs(family, connectivity, tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'acn-kernels[hf]'")

    from acn_kernels.long_connections import owner_of

    model = acnify(small_bert() if family == "bert" else decoder(family), connectivity=connectivity,
                   backend="reference").double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gates." in name:
                p.uniform_(0.2, 0.8)
    shallow = model.truncate(2)
    shallow.save_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 3 and shallow.config.num_hidden_layers == 2
    auto = transformers.AutoModelForSequenceClassification if family == "bert" else transformers.AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path, attn_implementation="eager").double().eval()
    assert loaded.config.num_hidden_layers == 2
    owner_of(loaded)[1].long_connections.backend = "reference"  # loads as "auto": Triton, under the interpreter
    ids = torch.arange(1, 9)[None]
    torch.testing.assert_close(loaded(ids)[0], shallow(ids)[0], rtol=1e-12, atol=1e-12)


def test_hf_probe_refuses_an_unknown_output():
    model = acnify(small_bert(), backend="reference")
    with pytest.raises(ValueError, match=r"output must be one of \('logits', 'loss'\), got 'logitz'"):
        model.probe(input_ids=torch.randint(0, 50, (1, 5)), output="logitz")


@pytest.mark.parametrize("method", ("forward_intermediates", "get_intermediate_layers"))
def test_timm_entry_points_that_would_skip_the_sum_refuse(method):
    model = acnify(small_vit(), backend="reference")
    with pytest.raises(NotImplementedError, match="without the long connections; use probe"):
        getattr(model, method)(torch.randn(1, 3, 32, 32))


TASK_CLASSES = {"bert": ["BertModel", "BertForMaskedLM", "BertForMultipleChoice", "BertForNextSentencePrediction",
                         "BertForPreTraining", "BertForQuestionAnswering", "BertForSequenceClassification",
                         "BertForTokenClassification"],
                "gpt2": ["GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ForQuestionAnswering",
                         "GPT2ForSequenceClassification", "GPT2ForTokenClassification"],
                "llama": ["LlamaModel", "LlamaForCausalLM", "LlamaForQuestionAnswering",
                          "LlamaForSequenceClassification", "LlamaForTokenClassification"]}


@pytest.mark.parametrize("family, cls_name", [(f, c) for f, names in TASK_CLASSES.items() for c in names])
def test_every_task_head_and_hidden_state_of_a_converted_model_is_the_acns(family, cls_name):
    """Each task class runs the ACN: output_hidden_states are the running sums by hand (a decoder's
    last one after the final norm), its first output the last depth of probe."""
    pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'acn-kernels[hf]'")
    built = small_bert(cls_name) if family == "bert" else decoder(family, class_name=cls_name)
    model = acnify(built, backend="reference").double().eval()
    choices = cls_name == "BertForMultipleChoice"
    ids = torch.randint(1, 50, (2, 2, 7) if choices else (2, 7))
    outputs = model(input_ids=ids, output_hidden_states=True)
    flat = ids.flatten(0, 1) if choices else ids
    expected = (bert_sums_by_hand(model if cls_name == "BertModel" else model.bert, flat) if family == "bert"
                else decoder_by_hand(model, flat, residual=False, every_layer=True))
    assert len(outputs.hidden_states) == len(expected) == 4
    for got, want in zip(outputs.hidden_states, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if cls_name not in ("BertModel", "GPT2Model", "LlamaModel") and not choices:
        torch.testing.assert_close(model.probe(input_ids=ids)[-1], outputs[0], rtol=1e-12, atol=1e-12)


TIMM_METHODS = {  # every public method timm's VisionTransformer adds to nn.Module, and what it does on an ACN
    "computes": ("forward_features", "forward_head", "pool"),
    "refuses": ("forward_intermediates", "get_intermediate_layers", "prune_intermediate_layers"),
    "touches no block output": ("fix_init_weight", "get_classifier", "group_matcher", "init_weights",
                                "load_pretrained", "no_weight_decay", "reset_classifier", "set_grad_checkpointing",
                                "set_input_size"),
}


def test_every_public_method_of_an_acnified_timm_vit_computes_the_acn_or_refuses():
    timm = pytest.importorskip("timm", reason="needs the [timm] extra: pip install 'acn-kernels[timm]'")
    vit = timm.models.vision_transformer.VisionTransformer
    public = {n for n in dir(vit) if not n.startswith("_") and callable(getattr(vit, n)) and not hasattr(nn.Module, n)}
    known = {n for names in TIMM_METHODS.values() for n in names}
    assert public - known == set(), "a timm method this test does not know: does it walk the blocks?"
    model = acnify(small_vit(), backend="reference").double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    features = model.forward_features(images)
    torch.testing.assert_close(features, vit_features_by_hand(model, images), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.forward_head(features), model(images), rtol=0, atol=0)
    torch.testing.assert_close(model.head(model.fc_norm(model.pool(features))), model(images), rtol=0, atol=0)
    for method in TIMM_METHODS["refuses"]:
        with pytest.raises(NotImplementedError, match="without the long connections"):
            getattr(model, method)(images if method != "prune_intermediate_layers" else 1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("form", ["h-acn", "long-short", "lsn"])
def test_an_acnified_lm_takes_the_authors_hybrid_forms_and_saves_them(family, form, tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'acn-kernels[hf]'")
    options = dict(connectivity="hybrid", gate_scope="block", gate_init=0.0, clamp_range=(0.0, 1.0))
    if form in ("long-short", "lsn"):
        options.update(long_weights=True, x0_weight=True, gates_from_long_weights=True, long_weight_init=0.8,
                       skip_attention=form == "lsn")
    model = acnify(decoder(family), backend="reference", **options).double().eval()
    scalars = sorted(n for n, p in model.named_parameters() if p.shape == (1,))
    prefix = "transformer." if family == "gpt2" else "model."
    expected = ([f"long_weights.{i}" for i in range(3)] + ["x0_weight.0"] if form != "h-acn"
                else [f"gates.{i}" for i in range(3)])
    assert scalars == [prefix + n for n in expected]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.shape == (1,):
                p.uniform_(0.1, 0.9)
    long = base_of(model).long_connections
    alphas = [long.x0_weight[0], *long.long_weights] if form != "h-acn" else [1 - g for g in long.gates]
    ids = torch.randint(1, 50, (2, 9))
    torch.testing.assert_close(last_hidden(model, ids), decoder_by_hand(model, ids, residual=False, alphas=alphas,
                                                                        long_short=form != "h-acn",
                                                                        skip_attention=form == "lsn"),
                               rtol=1e-12, atol=1e-12)
    optimizer = torch.optim.SGD(model.parameters(), lr=100.0)
    model.clamp_after(optimizer)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(0.0 <= p.item() <= 1.0 for p in long.scalars.all())
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").double().eval()
    base_of(loaded).long_connections.backend = "reference"
    assert base_of(loaded).long_connections.scalars.options.clamp_range == (0.0, 1.0)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_hf_probe_runs_the_layers_once_and_the_model_twice(family):
    model = acnify(small_bert() if family == "bert" else decoder(family), backend="reference").double().eval()
    attentions = [m for m in model.modules() if type(m).__name__ in ("BertSelfAttention", "GPT2Attention",
                                                                      "LlamaAttention")]
    calls = {"attention": 0, "model": 0}

    def count(name):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)
    hooks = [m.register_forward_hook(count("attention")) for m in attentions] + [model.register_forward_hook(
        count("model"))]
    ids = torch.randint(1, 50, (2, 9))
    probed = model.probe(input_ids=ids, attention_mask=torch.ones_like(ids))
    for hook in hooks:
        hook.remove()
    assert len(attentions) == 3 and calls == {"attention": 3, "model": 2}  # each layer once; the model twice
    for k in range(4):  # and still every depth's output
        torch.testing.assert_close(probed[k], model.truncate(k)(input_ids=ids)[0], rtol=1e-12, atol=1e-12)


def test_compress_takes_a_dict_of_keyword_inputs_with_an_attention_mask():
    from acn_kernels import compress
    from acn_kernels.depth import depth_scores

    model = acnify(small_bert(), backend="reference").double()
    ids = torch.randint(1, 50, (12, 9))
    mask = torch.ones_like(ids)
    mask[:5, 6:] = 0  # padded rows: the mask changes the logits
    labels = torch.randint(0, 3, (12,))
    inputs = {"input_ids": ids, "attention_mask": mask}
    report = compress(model, inputs, labels, metric="loss", repeats=1, timing_batch=4)
    logits = model.eval().probe(**inputs)
    expected = [torch.nn.functional.cross_entropy(depth, labels).item() for depth in logits]
    assert report.scores == pytest.approx(expected, rel=1e-9)
    assert report.scores != pytest.approx(depth_scores(model, ids, labels, "loss"), rel=1e-9)  # the mask was used
    with pytest.raises(ValueError, match=r"inputs must be a tensor or a dict of tensors of one batch size, got "
                                         r"sizes \{'input_ids': 12, 'attention_mask': 3\}"):
        compress(model, {"input_ids": ids, "attention_mask": mask[:3]}, labels)


SPECULATIVE_FORMS = {"acn": {}, "hybrid": dict(connectivity="hybrid", gate_init=0.3),
                     "long-short": dict(connectivity="hybrid", gate_scope="block", long_weights=True, x0_weight=True,
                                        gates_from_long_weights=True, long_weight_init=0.8)}


def speculative_lm(family: str, form: str = "acn", dtype=torch.float64, sharpen: float = 8.0, **config):
    """An acnify'd causal LM whose layers' output projections are scaled by `sharpen`, so that its
    shallow readouts disagree with the full model often (rejected drafts)."""
    model = acnify(decoder(family, eos_token_id=None, bos_token_id=None, **config), backend="reference",
                   **SPECULATIVE_FORMS[form]).to(dtype).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                parameter.mul_(sharpen)
    return model


def left_padded(batch: int, positions: int = 6, vocab: int = 50) -> tuple:
    """(input_ids, attention_mask): row r padded on the left by 2r positions (the pad token 0)."""
    ids = torch.randint(1, vocab, (batch, positions), generator=torch.Generator().manual_seed(batch))
    mask = (torch.arange(positions) >= 2 * torch.arange(batch)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", CAUSAL_LMS)
@pytest.mark.parametrize("form", SPECULATIVE_FORMS)
def test_hf_greedy_speculative_tokens_are_generates_with_left_padding(family, form):
    from acn_kernels import speculative_generate

    rejected = False
    for dtype, attention in ((torch.float64, "eager"), (torch.float32, "sdpa")):
        model = speculative_lm(family, form, dtype, attn_implementation=attention)
        for batch in (1, 3):
            ids, mask = left_padded(batch)
            plain = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
            for depth, length in ((1, 1), (1, 3), (2, 2), (2, 5)):
                tokens, stats = speculative_generate(model, ids, 10, draft_depth=depth, draft_tokens=length,
                                                     attention_mask=mask)
                assert torch.equal(tokens, plain), (dtype, batch, depth, length)
                assert stats.new_tokens == 10 and stats.batch == batch and 0 <= stats.accepted <= stats.drafted
                rejected |= stats.accepted < stats.drafted
    assert rejected  # drafts were cut from the caches, and the tokens still agree


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_speculation_stops_at_the_end_of_sequence_as_generate_does(family):
    from acn_kernels import speculative_generate

    model = speculative_lm(family)
    ids, mask = left_padded(3)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    for eos in (int(free[0, 10]), [int(t) for t in free[:, 9]]):
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, eos_token_id=eos,
                               pad_token_id=0)
        for depth, length in ((1, 3), (2, 2)):
            tokens, _ = speculative_generate(model, ids, 14, draft_depth=depth, draft_tokens=length,
                                             attention_mask=mask, eos_token_id=eos, pad_token_id=0)
            assert torch.equal(tokens, plain), (eos, depth, length)
    assert plain.shape[1] <= 10  # every row ended by position 9


def test_a_truncated_hf_lm_drafts_with_its_own_depth():
    from acn_kernels import speculative_generate

    shallow = speculative_lm("llama", layers=4).truncate(3)
    ids, mask = left_padded(2)
    tokens, _ = speculative_generate(shallow, ids, 6, draft_depth=2, attention_mask=mask)
    assert torch.equal(tokens, shallow.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
    with pytest.raises(ValueError, match=r"draft_depth must be an integer in \[1, 2\] .*, got 3"):
        speculative_generate(shallow, ids, 6, draft_depth=3, attention_mask=mask)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_sampled_speculative_tokens_follow_the_full_models_distribution(family):
    from acn_kernels import speculative_generate
    from sampling_checks import assert_pair_frequencies, exact_pairs

    model = speculative_lm(family, vocab_size=5, sharpen=4.0)
    prompt = torch.tensor([[1, 4, 2, 3]])
    tokens, stats = speculative_generate(model, prompt.expand(6000, -1), 2, draft_depth=1, draft_tokens=2,
                                         do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(0))
    assert 0 < stats.accepted < stats.drafted  # both branches of the rule ran
    assert_pair_frequencies(tokens, exact_pairs(lambda t: model(t).logits[:, -1], prompt, 0.8, None))


def test_hf_speculative_decoding_names_its_bad_arguments():
    from acn_kernels import speculative_generate

    model = speculative_lm("gpt2")
    ids, mask = left_padded(2)
    for depth in (0, 3, True):
        with pytest.raises(ValueError, match=rf"draft_depth must be an integer in \[1, 2\] .*, got {depth!r}"):
            speculative_generate(model, ids, 3, draft_depth=depth)
    with pytest.raises(ValueError, match=r"attention_mask must be an integer tensor of shape \(2, 6\) \(input_ids' "
                                         r"shape\), got dtype torch.int64 and shape \(2, 5\)"):
        speculative_generate(model, ids, 3, draft_depth=1, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match=r"attention_mask must mark left padding"):
        speculative_generate(model, ids, 3, draft_depth=1, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor of shape \(batch, positions\), got "
                                         r"dtype torch.float32"):
        speculative_generate(model, ids.float(), 3, draft_depth=1)
    for other in (decoder("gpt2"), acnify(decoder("gpt2", "GPT2ForSequenceClassification"))):
        with pytest.raises(TypeError, match=r"model must be an ACN-style language model with speculator\(\) .*, "
                                            rf"got {type(other).__name__}"):
            speculative_generate(other, ids, 3, draft_depth=1)


@pytest.mark.parametrize("family", CAUSAL_LMS)
@pytest.mark.parametrize("form", ["acn", "long-short"])
def test_transformers_early_exit_generate_drafts_with_the_first_layers(family, form):
    """generate(assistant_early_exit=k), transformers' self-speculative decoding (LayerSkip's): the
    forward honours config.num_hidden_layers = k as the model's own layer loop does (the running sum
    after k layers through the final norm and head), greedy tokens are plain generate's, and the
    config is the model's again afterwards."""
    model = speculative_lm(family, form)
    ids, mask = left_padded(2)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.transformer
    base.config.num_hidden_layers = 1
    try:
        early = model(input_ids=ids, attention_mask=mask).logits
    finally:
        base.config.num_hidden_layers = 3
    torch.testing.assert_close(early, model.truncate(1)(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-12,
                               equal_nan=True)  # eager attention of a padded position: NaN in both
    full = model(input_ids=ids, attention_mask=mask).logits
    prompt = ids[1:, 2:]  # transformers drafts for a batch of one
    plain = model.generate(prompt, max_new_tokens=12, do_sample=False)
    for k in (1, 2):
        drafted = model.generate(prompt, max_new_tokens=12, do_sample=False, assistant_early_exit=k)
        assert torch.equal(drafted, plain), k
        assert model.config.num_hidden_layers == 3
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, full, rtol=0, atol=0,
                               equal_nan=True)  # the whole model again


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_acnified_lms_token_ids_and_positions_are_checked_before_any_work(family):
    """Ids outside the vocabulary (a bare IndexError in the embeddings) and generation past the
    model's positions (GPT-2's n_positions: an IndexError; a Llama's max_position_embeddings: nothing
    at all) are named with the argument and the limit, in generate, speculative_generate and forward."""
    from acn_kernels import speculative_generate

    model = speculative_lm(family)
    ids = torch.randint(1, 50, (2, 6))
    bad = ids.clone()
    bad[1, 2] = 57
    vocabulary = r"input_ids must be in \[0, 50\) \(the model's vocabulary: its embedding's rows\), got values in "
    for call in (lambda: model.generate(bad, max_new_tokens=2), lambda: model.generate(input_ids=bad, max_new_tokens=2),
                 lambda: speculative_generate(model, bad, 2, draft_depth=1), lambda: model(input_ids=bad)):
        with pytest.raises(ValueError, match=vocabulary + r"\[\d+, 57\]"):
            call()
    past = r"input_ids and max_new_tokens must fit the model's 32 positions \(config.max_position_embeddings\), got " \
           r"6 positions and 27 new tokens, 33 in all"
    for call in (lambda: model.generate(ids, max_new_tokens=27), lambda: speculative_generate(model, ids, 27, draft_depth=1)):
        with pytest.raises(ValueError, match=past):
            call()
    with pytest.raises(ValueError, match=r"input_ids must fit the model's 32 positions .*, got positions up to 32, 33 "):
        model(input_ids=torch.randint(1, 50, (1, 33)))
    assert model.generate(ids, max_new_tokens=26).shape == (2, 32)  # the last position is still the model's
    padded, mask = left_padded(2, positions=8)
    assert model.generate(padded, attention_mask=mask, max_new_tokens=24).shape == (2, 32)  # 6 positions + 24 new


def test_the_benchs_llama_copy_of_a_package_gpt_has_its_logits_and_speculates_alike():
    """bench --suite speculative part 3: the package's Llama-style GPT as an acnify'd transformers Llama
    (rotary pairs permuted) gives the same logits at every depth, so transformers' early-exit drafting,
    speculative_generate and plain generate keep the same tokens."""
    pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'acn-kernels[hf]'")
    from acn_kernels import GPT, speculative_generate
    from acn_kernels.tools.speculative_bench import as_hf_llama

    torch.manual_seed(0)
    gpt = GPT(40, 24, 32, 3, 4, norm="rmsnorm", mlp="swiglu", positions="rotary", bias=False,
              backend="reference").double().eval()
    lm = as_hf_llama(gpt)
    ids = torch.randint(0, 40, (2, 9))
    # within the rounding of the rotary tables, which both keep in float32
    torch.testing.assert_close(lm(input_ids=ids).logits, gpt(ids), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm.probe(input_ids=ids), gpt.probe(ids), rtol=1e-5, atol=1e-6)
    prompt = ids[:1, :5]
    plain = gpt.generate(prompt, 10)
    assert torch.equal(lm.generate(prompt, max_new_tokens=10, do_sample=False), plain)
    assert torch.equal(lm.generate(prompt, max_new_tokens=10, do_sample=False, assistant_early_exit=1), plain)
    assert torch.equal(speculative_generate(lm, prompt, 10, draft_depth=2)[0], plain)


# ----------------------------------------------------------------------------- acn_kernels.training on them

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_acnified_lms_early_exit_loss_is_the_exits_losses_by_hand(family):
    model = acnify(decoder(family), backend="reference").double().eval()  # GPT-2's dropout off
    ids = torch.randint(1, 50, (2, 8))
    # Llama's RMSNorm computes in float32 even on float64 hidden states: its probe is that exact
    check_against_probe(model, lambda x: model.probe(input_ids=x), ids, ids, rtol=1e-5, curriculum="rotational", step=3)



def test_an_acnified_lm_anneals_then_saves_and_reloads_as_an_acn(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'acn-kernels[hf]'")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = acnify(transformers.GPT2LMHeadModel(config), backend="reference", connectivity="hybrid",
                   gate_scope="block", learn_gates=False).double().eval()
    schedule = GateAnnealing(model, total_steps=4, fraction=0.5)
    schedule.step(), schedule.step()
    ids = torch.randint(0, 50, (2, 9))
    before = model(ids).logits
    as_acn(model)
    assert not any(".gates." in name for name in model.state_dict())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).double().eval()
    assert not loaded.transformer.long_connections.hybrid
    loaded.transformer.long_connections.backend = "reference"
    torch.testing.assert_close(loaded(ids).logits, before, rtol=1e-12, atol=1e-12)


def test_a_find_spec_of_transformers_after_importing_the_package_leaves_reloading_as_an_acn(tmp_path):
    """A library's check for an optional package (importlib.util.find_spec, no import) between importing
    acn_kernels and transformers: the registration still happens when transformers is imported."""
    import subprocess
    import sys
    pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'acn-kernels[hf]'")
    script = f"""
import importlib.util
import acn_kernels
importlib.util.find_spec("transformers")
import transformers
config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
acn_kernels.acnify(transformers.GPT2LMHeadModel(config), backend="reference").save_pretrained({str(tmp_path)!r})
loaded = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
assert hasattr(loaded.transformer, "long_connections"), "reloaded without its long connections"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------- across processes

WORLDS = (2, 4)  # tests/spawned.py runs cases(world) in the session's spawn of that many processes
FSDP_STEPS = 3


def cases(world: int) -> list:
    """2 processes: an acnify'd Llama of each long connectivity, FSDP2 on each decoder layer then the root;
    4: parallelize on a 2 x 2 (dp, tp) mesh."""
    import importlib.util
    if importlib.util.find_spec("transformers") is None:
        return []
    if world == 4:
        return [dict(name=f"2 x 2 fsdp2 x tp llama {connectivity}", connectivity=connectivity, parallelize=True,
                     early_exit=early_exit) for connectivity, early_exit in (("acn", True), ("hybrid", False),
                                                                             ("lsn", True))]
    return [dict(name=f"fsdp2 per layer llama {connectivity}", connectivity=connectivity)
            for connectivity in ("acn", "hybrid", "lsn")] + [
        dict(name="fsdp2 per layer llama acn, every exit's loss", connectivity="acn", early_exit=True)]


def fsdp_llama(case: dict):
    """A small Llama acnify'd (the LSN: the authors' long weights and attention skip), on the fused ops."""
    forms = {"hybrid": dict(connectivity="hybrid", gate_scope="block", long_weights=True, x0_weight=True),
             "lsn": dict(connectivity="hybrid", gate_scope="block", long_weights=True, x0_weight=True,
                         gates_from_long_weights=True, long_weight_init=0.8, skip_attention=True)}
    model = acnify(decoder("llama"), backend="auto", **forms.get(case["connectivity"], dict(connectivity="acn")))
    return model


def train_llama(model, ids, case: dict) -> None:
    """FSDP_STEPS SGD steps of every exit's loss, or the model's own (with parallelize the last exit's
    cross-entropy on the logits split on the vocabulary, in torch's loss_parallel)."""
    import torch.nn.functional as F

    from acn_kernels import early_exit_loss
    from acn_kernels.parallel import loss_context

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(FSDP_STEPS):
        optimizer.zero_grad()
        if case.get("early_exit"):
            early_exit_loss(model, ids, ids).backward()
        elif case.get("parallelize"):
            logits = model(input_ids=ids[:, :-1]).logits
            with loss_context(logits):
                F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        else:
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


def llama_batch():
    return torch.randint(1, 50, (4, 12), generator=torch.Generator().manual_seed(3))


def run_on_rank(case: dict, rank: int, world: int, calls) -> dict:
    """fully_shard on each decoder layer, then the root, as every recipe does; this rank's share of the
    batch; the whole state after training."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from acn_kernels.parallel import parallelize

    model, ids = fsdp_llama(case), llama_batch()
    if case.get("parallelize"):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize(model, mesh)
        rank, world = mesh["dp"].get_local_rank(), 2  # each tensor-parallel pair one share of the batch
    else:
        for layer in base_of(model).layer_list():
            fully_shard(layer)
        fully_shard(model)
    train_llama(model, ids[rank * len(ids) // world:(rank + 1) * len(ids) // world], case)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", cases(2) + cases(4) or [pytest.param(None, marks=pytest.mark.skip(
    reason="needs the [hf] extra: pip install 'acn-kernels[hf]'"))], ids=lambda case: case and case["name"])
def test_fsdp2_on_each_decoder_layer_and_tensor_parallelism_train_as_one_process(case, tmp_path_factory):
    """FSDP2 on each decoder layer then the root (2 processes), parallelize on a 2 x 2 mesh (4)."""
    from spawned import session_results

    world = 4 if case.get("parallelize") else 2
    spawned = session_results(__name__, world, tmp_path_factory)
    model = fsdp_llama(case)
    train_llama(model, llama_batch(), case)
    for rank, results in enumerate(spawned):
        result = results[cases(world).index(case)]
        assert not isinstance(result, tuple), f"rank {rank} raised {result[1]}"
        for name, value in model.state_dict().items():
            torch.testing.assert_close(result[name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
