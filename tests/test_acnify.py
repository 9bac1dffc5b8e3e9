"""acnify on small timm ViT and Hugging Face BERT configurations (no weights downloaded): the output
equals a hand-written ACN loop over the same submodules (float64, eval mode), the state_dict round
trip with the unconverted model, one AdamW step trains, and probe[k] equals truncate(k)'s output.
timm and transformers come with the [timm] and [hf] extras (CI installs them beside the CUDA torch,
which torchvision needs)."""
import copy

import pytest
import torch
from torch import nn

from acn_kernels import ShrinkOnCompression, acnify
from op_harness import FUSED_BACKENDS


def test_unsupported_models_name_the_supported_classes():
    with pytest.raises(TypeError, match=r"acnify supports timm.models.vision_transformer.VisionTransformer and "
                                        r"transformers BertModel .* got Linear"):
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


def vit_by_hand(m, images):
    """The ACN of the definition over timm's own submodules (eval mode: no drop path)."""
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
    total = x
    for b in m.blocks:
        x = b.ls2(b.mlp(b.norm2(b.ls1(b.attn(b.norm1(x))))))
        total = total + x
    return m.forward_head(m.norm(total))


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
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return getattr(transformers, cls_name)(config)


def bert_by_hand(m, ids):
    """AC-BERT over the model's own submodules: post-LN layers without their two adds, the running
    sum from the embedding output, no final norm, the pooler and classifier on the sum."""
    x = m.bert.embeddings(input_ids=ids)
    total = x
    for layer in m.bert.encoder.layer:
        attention = layer.attention.self(x)[0]
        attention = layer.attention.output.LayerNorm(layer.attention.output.dense(attention))
        x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(attention)))
        total = total + x
    return m.classifier(m.bert.pooler(total))


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
