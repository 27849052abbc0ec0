"""quantization.backend beyond bitsandbytes (issue 9): quanto and torchao train and merge on the CPU; hqq, gptq,
awq and missing extras are refused at start, naming the key, with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_qtune
from qtune.config import load_recipe
from qtune.errors import QtuneError
from qtune.model import Launch, load
from qtune.quant import check_backend

SINGLE = Launch(world_size=1, rank=0, local_rank=0, distributed_type="NO")
# backend, bits, module that must import (the dev extra installs both)
RUNNABLE = [("quanto", 8, "optimum.quanto"), ("quanto", 4, "optimum.quanto"), ("torchao", 8, "torchao")]


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
        ({"backend": "hqq", "bits": 4}, ["quantization.backend: hqq"]),
        ({"backend": "bitsandbytes"}, ["quantization.backend"]),
    ],
)
def test_unsupported_backend_or_bits_refused_at_start(make_recipe, tmp_path, quantization, needles):
    _refused(make_recipe, tmp_path, quantization, *needles)


def test_hqq_refusal_says_why(make_recipe, tmp_path):
    """hqq installs, but transformers 5.x raises NotImplementedError when loading with HqqConfig."""
    stderr = _refused(make_recipe, tmp_path, {"backend": "hqq", "bits": 4}, "quantization.backend: hqq")
    assert "pip install 'qtune[hqq]'" in stderr or "not available yet" in stderr


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
        weight = layer.base_layer.weight
        data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        assert type(data) is not torch.Tensor, f"{backend}: base weight is a plain tensor, not quantized"
        assert not weight.requires_grad
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


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
