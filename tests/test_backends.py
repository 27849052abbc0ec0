"""quantization.backend beyond bitsandbytes (issue 9): quanto, torchao and hqq train and merge on the CPU; gptq,
awq, GPTQ / AWQ checkpoints and missing extras are refused at start, naming the key, with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_qtune
from qtune.config import load_recipe
from qtune.errors import QtuneError
from qtune.export import quantize
from qtune.model import Launch, check_architecture, load
from qtune.quant import check_backend, quantization_config

SINGLE = Launch(world_size=1, rank=0, local_rank=0, distributed_type="NO")
# backend, bits, module that must import (the dev extra installs both)
RUNNABLE = [
    ("quanto", 8, "optimum.quanto"),
    ("quanto", 4, "optimum.quanto"),
    ("torchao", 8, "torchao"),
    ("hqq", 8, "hqq"),
    ("hqq", 4, "hqq"),
]


def _refused(make_recipe, tmp_path, quantization: dict, *needles: str):
    recipe = make_recipe(quantization=quantization)
    result = run_qtune("train", recipe)
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for a refused recipe"
    return result.stderr


@pytest.mark.parametrize(
    ("quantization", "needles"),
    [
        ({"backend": "torchao", "bits": 4}, ["quantization.backend torchao", "quantization.bits 4", "offers: 8"]),
        ({"backend": "quanto", "bits": None}, ["quantization.backend quanto needs quantization.bits"]),
        ({"backend": "quanto", "bits": 8, "quant_type": "fp4"}, ["quantization.quant_type only apply to backend bnb"]),
        ({"backend": "gptq", "bits": 4}, ["quantization.backend: gptq needs a CUDA GPU", "unverified"]),
        ({"backend": "awq", "bits": 4}, ["quantization.backend: awq needs a CUDA GPU", "unverified"]),
        ({"backend": "hqq", "bits": 3}, ["quantization.bits", "4 or 8"]),
        ({"backend": "bitsandbytes"}, ["quantization.backend"]),
    ],
)
def test_unsupported_backend_or_bits_refused_at_start(make_recipe, tmp_path, quantization, needles):
    _refused(make_recipe, tmp_path, quantization, *needles)


def test_hqq_prefers_transformers_loading_when_it_exists(make_recipe, monkeypatch):
    """transformers 5.24 cannot load with HqqConfig (qtune quantizes after loading); a release that can is used."""
    pytest.importorskip("hqq")
    from qtune import quant

    recipe = load_recipe(make_recipe(quantization={"backend": "hqq", "bits": 4}))
    assert (quantization_config(recipe) is None) == (not quant.hqq_quantizes_on_load())  # None with transformers 5.24
    monkeypatch.setattr(quant, "hqq_quantizes_on_load", lambda: True)
    config = quantization_config(recipe)
    assert type(config).__name__ == "HqqConfig" and config.quant_config["weight_quant_params"]["nbits"] == 4


def test_missing_extra_names_it(make_recipe, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("optimum") else real(name, *a)
    )
    recipe = load_recipe(make_recipe(quantization={"backend": "quanto", "bits": 8}))
    with pytest.raises(QtuneError) as info:
        check_backend(recipe)
    assert "quantization.backend: quanto is not installed" in str(info.value)
    assert "pip install 'qtune[quanto]'" in str(info.value.hint)


@pytest.mark.parametrize(("backend", "bits", "module"), RUNNABLE)
def test_backend_layers_are_quantized_under_lora(make_recipe, backend, bits, module):
    pytest.importorskip(module)
    recipe = load_recipe(make_recipe(quantization={"backend": backend, "bits": bits}))
    model, _ = load(recipe, SINGLE, verbose=False)
    lora_layers = [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    assert len(lora_layers) == 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)
    for layer in lora_layers:
        if backend == "hqq":
            from hqq.core.quantize import HQQLinear

            assert isinstance(layer.base_layer, HQQLinear) and layer.base_layer.meta["nbits"] == bits
            assert layer.base_layer.W_q.dtype in (torch.uint8, torch.int32) and not layer.base_layer.W_q.requires_grad
            continue
        weight = layer.base_layer.weight
        data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        assert type(data) is not torch.Tensor, f"{backend}: base weight is a plain tensor, not quantized"
        assert not weight.requires_grad
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if backend == "hqq":  # every decoder linear is an HQQLinear; only the output layer stays an nn.Linear
        plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and ".lora_" not in n]
        assert [n.rsplit(".", 1)[-1] for n in plain] == ["lm_head"]


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "bits", "module"), RUNNABLE)
def test_train_then_merge(make_recipe, tmp_path, backend, bits, module):
    pytest.importorskip(module)
    recipe = make_recipe(quantization={"backend": backend, "bits": bits}, training={"max_steps": 2})
    result = run_qtune("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{bits}-bit {backend}" in result.stdout + result.stderr
    run = tmp_path / "run"
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b), "lora_B starts at zero: training must change it"

    result = run_qtune("merge", run)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "merged" / "qtune_merge.json").read_text())
    assert report["onto"] == "dequantized"
    assert report["vs_trained"]["max_diff"] <= 1e-4 * max(1.0, report["vs_trained"]["scale"])
    assert report["vs_trained"]["top1"] == 1.0
    config = json.loads((run / "merged" / "config.json").read_text())
    assert "quantization_config" not in config, "the merged model is plain weights"
    merged = load_file(next((run / "merged").glob("*.safetensors")))
    assert all(t.dtype == torch.float32 for t in merged.values())


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "bits", "module"), RUNNABLE)
def test_trains_on_a_bf16_load(make_recipe, tmp_path, backend, bits, module):
    """The GPU's usual load dtype: peft's fp32 upcast of the non-quantized parts must not touch quanto's weights
    (they refuse a dtype change); every backend trains and its LoRA weights move."""
    pytest.importorskip(module)
    recipe = make_recipe(
        model={"dtype": "bfloat16"}, quantization={"backend": backend, "bits": bits}, training={"max_steps": 2}
    )
    result = run_qtune("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)


# --------------------------------------------------------------------------- GPTQ / AWQ checkpoints as the base


@pytest.fixture(params=["gptq", "awq", "bitsandbytes"])
def prequantized(request, tiny_llama, tmp_path):
    """The tiny llama's config as a GPTQ / AWQ / bitsandbytes checkpoint ships it (refused before loading)."""
    folder = tmp_path / f"{request.param}-llama"
    folder.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    config["quantization_config"] = {"quant_method": request.param, "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    return request.param, folder


@pytest.mark.parametrize("quantization", [{"bits": 4}, {"bits": None}, {"backend": "quanto", "bits": 8}])
def test_prequantized_checkpoint_refused_for_training(make_recipe, prequantized, quantization):
    """bits: null would load it as plain weights (transformers drops the checkpoint's quantization_config when
    from_pretrained gets quantization_config=None) and train on uninitialised layers: refused as well."""
    method, folder = prequantized
    recipe = load_recipe(make_recipe(model={"name": str(folder)}, quantization=quantization))
    with pytest.raises(QtuneError) as info:
        check_architecture(recipe)
    key = "model.name" if quantization["bits"] is None else "quantization.bits"
    assert str(info.value).startswith(f"{key}: '{folder}' is already quantized ({method}")
    assert "unquantized checkpoint" in info.value.hint


def test_merge_quantize_onto_prequantized_base_refused(make_recipe, prequantized, tmp_path):
    """The issue's case: a GPTQ / AWQ checkpoint asked to merge into 4-bit weights. Refused before loading."""
    method, folder = prequantized
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(make_recipe().read_text())
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    result = run_qtune("merge", run, "--base", folder, "--quantize", "4")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: --base: '{folder}' is already quantized ({method}" in result.stderr
    assert "merge --quantize 4 needs unquantized weights" in result.stderr
    assert not (run / "merged").exists()

    with pytest.raises(QtuneError, match=r"^MODEL: .* already quantized .*quantize --bits 8"):
        quantize(str(folder), 8, out=tmp_path / "q8")
    assert not (tmp_path / "q8").exists()
