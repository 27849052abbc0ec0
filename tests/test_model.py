"""Quantized loading, k-bit preparation and LoRA on tiny local models, inspected module by module."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch

from qtune.config import load_recipe
from qtune.errors import QtuneError
from qtune.model import Launch, check_architecture, load_for_training, load_tokenizer

SINGLE = Launch(world_size=1, rank=0, local_rank=0, distributed_type="NO")


def _load(make_recipe, *overrides: str, model_path=None):
    extra = {"model": {"name": str(model_path)}} if model_path else {}
    recipe = load_recipe(make_recipe(**extra), overrides)
    tokenizer = load_tokenizer(recipe)
    return recipe, load_for_training(recipe, SINGLE, tokenizer, verbose=False), tokenizer


def _linear_layers(model):
    base = model.get_base_model()
    return {
        name: m
        for name, m in base.named_modules()
        if name.endswith(("q_proj", "down_proj")) and not name.endswith(("lora_A", "lora_B"))
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_4bit_nf4_double_quant_is_really_stored_that_way(make_recipe, tiny_llama, tiny_qwen, arch):
    path = tiny_llama if arch == "llama" else tiny_qwen
    _, model, _ = _load(make_recipe, model_path=path)
    layers = [
        m.base_layer
        for m in model.modules()
        if hasattr(m, "base_layer") and isinstance(m.base_layer, bnb.nn.Linear4bit)
    ]
    assert len(layers) == 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)
    for layer in layers:
        weight = layer.weight
        assert isinstance(weight, bnb.nn.Params4bit)
        assert weight.dtype == torch.uint8 and weight.numel() * 2 == layer.in_features * layer.out_features
        state = weight.quant_state
        assert state.quant_type == "nf4"
        assert state.nested, "double quantization: the absmax constants are themselves quantized"
        assert state.absmax.dtype == torch.uint8 and state.state2 is not None
        assert state.state2.absmax.dtype == torch.float32
    base = model.get_base_model()
    # Embeddings, norms and lm_head stay unquantized (and trainable-ready in fp32 after k-bit prep).
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    assert base.get_input_embeddings().weight.dtype == torch.float32


def test_fp4_without_double_quant(make_recipe):
    _, model, _ = _load(make_recipe, "quantization.quant_type=fp4", "quantization.double_quant=false")
    state = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.quant_state
    assert state.quant_type == "fp4" and not state.nested and state.absmax.dtype == torch.float32


def test_8bit_layers_hold_int8_weights(make_recipe):
    _, model, _ = _load(make_recipe, "quantization.bits=8")
    layer = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.weight.dtype == torch.int8 and layer.weight.SCB is not None


def test_no_quantization_is_plain_lora(make_recipe):
    _, model, _ = _load(make_recipe, "quantization.bits=null")
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    assert not layer.weight.requires_grad


def test_kbit_prep_turns_on_non_reentrant_checkpointing(make_recipe):
    _, model, _ = _load(make_recipe)
    base = model.get_base_model()
    assert base.is_gradient_checkpointing
    ckpt = base.model.layers[0]._gradient_checkpointing_func
    assert ckpt.keywords == {"use_reentrant": False}


def test_lora_targets_scaling_and_variants(make_recipe):
    _, model, _ = _load(make_recipe, "lora.r=4", "lora.alpha=8", "lora.use_rslora=true", "lora.use_dora=true")
    q = model.get_base_model().model.layers[1].self_attn.q_proj
    assert q.r["default"] == 4
    assert math.isclose(q.scaling["default"], 8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    assert "default" in q.lora_magnitude_vector  # DoRA
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)  # all-linear leaves the output layer alone


def test_listed_targets_only(make_recipe):
    _, model, _ = _load(make_recipe, "lora.target_modules=[q_proj,v_proj]", "lora.modules_to_save=[lm_head]")
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}
    assert any("lm_head.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


def test_unknown_target_lists_linear_modules(make_recipe):
    recipe = load_recipe(make_recipe(), ["lora.target_modules=[q_proj,attn_out]"])
    with pytest.raises(QtuneError) as err:
        check_architecture(recipe)
    assert "'attn_out'" in err.value.message and "q_proj" not in err.value.message.split("matches")[0].replace(
        "'attn_out'", ""
    )
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in err.value.hint
    assert "lm_head" not in err.value.hint


def test_eval_pass_does_not_break_training_on_cpu(make_recipe):
    """bitsandbytes repacks 4-bit weights for a no-backward CPU kernel on a no-grad eval forward; after
    that, gradients would stop flowing through frozen layers. Train -> eval -> train must still learn."""
    _, model, tokenizer = _load(make_recipe)
    batch = tokenizer(["spell 1 2 3 4 : one two three four"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    layers = model.get_base_model().model.layers
    # Layer 0's adapter only gets a gradient through the frozen 4-bit layers above it.
    first_layer_b = layers[0].self_attn.q_proj.lora_B["default"].weight
    assert first_layer_b.grad is not None and first_layer_b.grad.abs().sum() > 0
    state = layers[0].self_attn.q_proj.base_layer.weight.quant_state
    assert not getattr(state, "packing_format_for_cpu", False) and state.nested


def test_pad_token_distinct_from_eos(make_recipe, tiny_llama, tmp_path):
    """A tokenizer saved without a pad token gets one that is not eos: unk where it has one, else a pad-like
    special token of its vocabulary (test_data covers reserved tokens and the eos fallback)."""
    from transformers import AutoTokenizer

    from qtune.model import load_tokenizer

    def without(*names: str):
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
        for name in names:
            setattr(tokenizer, name, None)
        folder = tmp_path / "-".join(names)
        tokenizer.save_pretrained(folder)
        assert AutoTokenizer.from_pretrained(folder).pad_token is None  # the choice is load_tokenizer's
        return load_tokenizer(load_recipe(make_recipe(), [f"model.tokenizer={folder}"]))

    tokenizer = without("pad_token")
    assert tokenizer.pad_token == tokenizer.unk_token == "<unk>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    tokenizer = without("pad_token", "unk_token")
    assert tokenizer.unk_token is None and tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
