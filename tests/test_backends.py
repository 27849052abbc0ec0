"""quantization.backend beyond bitsandbytes (issue 9): quanto, torchao and hqq train and merge on the CPU; gptq
trains on a pre-quantized GPTQ checkpoint and merges (when optimum + gptqmodel are installed); awq, checkpoints
that do not fit the backend and missing extras are refused at start, naming the key, with nothing written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_qtune_in_process
from qtune.config import load_recipe
from qtune.errors import QtuneError
from qtune.model import Launch, check_architecture, load_for_training, load_tokenizer
from qtune.quant import check_backend, quantization_config
from qtune.quantize import quantize

SINGLE = Launch(world_size=1, rank=0, local_rank=0, distributed_type="NO")
# backend, bits, module that must import (the dev extra installs both)
RUNNABLE = [
    ("quanto", 8, "optimum.quanto"),
    ("quanto", 4, "optimum.quanto"),
    ("torchao", 8, "torchao"),
    ("hqq", 8, "hqq"),
    ("hqq", 4, "hqq"),
]


def test_the_backend_table_is_the_one_place_that_names_backends():
    """quant.BACKENDS has one consistent entry per quantization.backend the recipe accepts, and no other module
    tests a backend's name (they ask the table)."""
    import re
    import typing
    from pathlib import Path

    from qtune.config import QuantizationSection
    from qtune.quant import BACKENDS, offered_bits

    assert typing.get_args(QuantizationSection.model_fields["backend"].annotation) == tuple(BACKENDS)
    for name, backend in BACKENDS.items():
        assert backend.name == name and backend.doc.startswith(name) and offered_bits(backend)
        assert backend.doc in QuantizationSection.model_fields["backend"].description
        if backend.refused:
            continue
        assert backend.config is not None and backend.dequantize is not None, name
        assert bool(backend.modules) == (backend.extra is not None), name
        assert backend.kbit_prepare or not backend.upcast, name  # the upcast is prepare_model_for_kbit_training's
    names = "|".join(BACKENDS)
    test = re.compile(rf"backend\s*(==|!=)\s*\"({names})\"|backend\s+(not\s+)?in\s*\(\"({names})\"")
    for path in (Path(__file__).parent.parent / "qtune").glob("*.py"):
        if path.name != "quant.py":
            assert not test.search(path.read_text(encoding="utf-8")), f"{path.name} tests a backend's name"


def _refused(make_recipe, tmp_path, quantization: dict, *needles: str):
    recipe = make_recipe(quantization=quantization)
    result = run_qtune_in_process("train", recipe)
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
        ({"backend": "gptq", "bits": 4}, ["quantization.backend: gptq trains on a pre-quantized GPTQ checkpoint"]),
        ({"backend": "awq", "bits": 4}, ["quantization.backend: awq is not offered", "unverified"]),
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


@pytest.mark.parametrize("missing", ["gptqmodel", "optimum"])
def test_missing_gptq_extra_names_it(make_recipe, monkeypatch, missing):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith(missing) else real(name, *a)
    )
    recipe = load_recipe(make_recipe(quantization={"backend": "gptq", "bits": 4}))
    with pytest.raises(QtuneError) as info:
        check_backend(recipe)
    assert f"quantization.backend: gptq is not installed (module {missing}" in str(info.value)
    assert "pip install 'qtune[gptq]'" in str(info.value.hint)


@pytest.mark.parametrize(("backend", "bits", "module"), RUNNABLE)
def test_backend_layers_are_quantized_under_lora(make_recipe, backend, bits, module):
    pytest.importorskip(module)
    recipe = load_recipe(make_recipe(quantization={"backend": backend, "bits": bits}))
    model = load_for_training(recipe, SINGLE, load_tokenizer(recipe), verbose=False)
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


PROMPT = "spell 1 2 3 4"


def adapter_on_quantized_base(run):
    """The reference built here, apart from qtune's merge: the run's base loaded quantized with plain transformers
    (the recipe's quantization config from qtune's builder, hqq quantized after loading as training does), the
    adapter attached with plain peft. Returns its logits on PROMPT with and without the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.quant import quantization_config, quantize_after_load, resolve_dtype

    recipe = load_recipe(run / "recipe.yaml")
    base = AutoModelForCausalLM.from_pretrained(
        recipe.model.name, quantization_config=quantization_config(recipe), dtype=resolve_dtype(recipe.model.dtype)
    )
    base = quantize_after_load(recipe, base)
    for module in base.modules():  # bitsandbytes' CPU repack on a no-grad forward would change the 4-bit constants
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    ids = AutoTokenizer.from_pretrained(run / "adapter")(PROMPT, return_tensors="pt")
    with torch.no_grad():
        with_adapter = model(**ids).logits[0].float()
        with model.disable_adapter():
            without = model(**ids).logits[0].float()
    return with_adapter, without


def check_merged_independently(run, rel_tol: float, min_top1: float) -> None:
    """The saved merged folder, loaded with plain transformers, against `adapter_on_quantized_base`: within
    rel_tol × max(1, max|logit|) and min_top1 agreement, and well inside what the adapter changes (else it moved
    nothing and the check would be vacuous)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference, without = adapter_on_quantized_base(run)
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    ids = AutoTokenizer.from_pretrained(run / "merged")(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = merged(**ids).logits[0].float()
    diff = (logits - reference).abs().max().item()
    effect = (reference - without).abs().max().item()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"{run}: merged vs adapter on the quantized base {diff:.3g}, adapter effect {effect:.3g}, top-1 {top1}")
    assert diff <= rel_tol * max(1.0, reference.abs().max().item()), (diff, effect)
    assert top1 >= min_top1
    # bf16 rounding (~3e-3 on this model) is close to the effect of 2 steps (~4e-2): a quarter of it is the margin.
    assert diff < effect / 4, f"the adapter moved the logits by {effect:.3g} only: the check is vacuous"


def merge_and_check(run):
    """`qtune merge RUN` (onto the dequantized base, fp32): exit 0, merged equals the adapter on the quantized base
    to 1e-4 × max|logit| with the same top-1, plain fp32 weights (by qtune's report, and independently). Returns
    the report and the merged tensors."""
    result = run_qtune_in_process("merge", run)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "merged" / "qtune_merge.json").read_text())
    assert report["onto"] == "dequantized"
    assert report["vs_trained"]["max_diff"] <= 1e-4 * max(1.0, report["vs_trained"]["scale"])
    assert report["vs_trained"]["top1"] == 1.0
    config = json.loads((run / "merged" / "config.json").read_text())
    assert "quantization_config" not in config, "the merged model is plain weights"
    merged = load_file(next((run / "merged").glob("*.safetensors")))
    assert all(t.dtype == torch.float32 for t in merged.values())
    check_merged_independently(run, rel_tol=1e-4, min_top1=1.0)
    return report, merged


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "bits", "module"), RUNNABLE)
def test_train_then_merge(make_recipe, tmp_path, backend, bits, module):
    pytest.importorskip(module)
    recipe = make_recipe(quantization={"backend": backend, "bits": bits}, training={"max_steps": 2})
    result = run_qtune_in_process("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{bits}-bit {backend}" in result.stdout + result.stderr
    run = tmp_path / "run"
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b), "lora_B starts at zero: training must change it"

    merge_and_check(run)


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "bits", "module"), [("bnb", 4, "bitsandbytes"), *RUNNABLE])
def test_trains_and_merges_from_a_bf16_load(make_recipe, tmp_path, backend, bits, module):
    """The GPU's usual load dtype: peft's fp32 upcast of the non-quantized parts must not touch quanto's weights
    (they refuse a dtype change); every backend trains, its LoRA weights move, and the default fp32 merge is
    checked at bf16's tolerance (its reference, the adapter on the bf16 base, carries bf16 rounding)."""
    pytest.importorskip(module)
    recipe = make_recipe(
        model={"dtype": "bfloat16"}, quantization={"backend": backend, "bits": bits}, training={"max_steps": 2}
    )
    result = run_qtune_in_process("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)

    result = run_qtune_in_process("merge", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "merged" / "qtune_merge.json").read_text())
    assert report["dtype"] == "float32" and report["tolerance"]["relative_max_diff"] == 5e-2
    assert report["vs_trained"]["top1"] >= 0.95
    check_merged_independently(tmp_path / "run", rel_tol=5e-2, min_top1=0.95)


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
    # a GPTQ checkpoint: the hint names the backend that takes it as it is
    assert ("quantization.backend: gptq and quantization.bits: 4" in info.value.hint) == (method == "gptq")


def test_backend_gptq_needs_a_gptq_checkpoint_of_its_bits(make_recipe, prequantized):
    """backend gptq loads the checkpoint as it was saved: AWQ / bitsandbytes ones, and a GPTQ one of other bits,
    are refused before anything loads (no gptqmodel needed to say so)."""
    method, folder = prequantized
    recipe = load_recipe(make_recipe(model={"name": str(folder)}, quantization={"backend": "gptq", "bits": 8}))
    with pytest.raises(QtuneError) as info:
        check_architecture(recipe)
    if method == "gptq":
        assert info.value.message == f"quantization.bits: 8, but '{folder}' is a 4-bit GPTQ checkpoint"
        assert "set quantization.bits: 4" in info.value.hint
    else:
        assert str(info.value).startswith("quantization.backend: gptq trains on a pre-quantized GPTQ checkpoint; ")
        assert f"'{folder}' is quantized with {method}" in str(info.value)


def test_backend_gptq_refuses_dora(make_recipe, tiny_llama, tmp_path):
    """peft's GPTQLoraLinear raises 'does not support DoRA yet' while attaching: said at start instead."""
    folder = tmp_path / "gptq-llama"
    folder.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    recipe = load_recipe(
        make_recipe(model={"name": str(folder)}, quantization={"backend": "gptq", "bits": 4}, lora={"use_dora": True})
    )
    with pytest.raises(QtuneError, match=r"^lora.use_dora: peft's LoRA layer for GPTQ weights"):
        check_architecture(recipe)


def test_backend_gptq_on_plain_weights_refused(make_recipe, tiny_llama):
    recipe = load_recipe(make_recipe(quantization={"backend": "gptq", "bits": 4}))
    with pytest.raises(QtuneError) as info:
        check_architecture(recipe)
    assert info.value.message == (
        f"quantization.backend: gptq trains on a pre-quantized GPTQ checkpoint; '{tiny_llama}' has no "
        "quantization_config (plain weights)"
    )
    assert "quantization.backend bnb, quanto, torchao or hqq" in info.value.hint


def test_merge_quantize_onto_prequantized_base_refused(make_recipe, prequantized, tmp_path):
    """The issue's case: a GPTQ / AWQ checkpoint asked to merge into 4-bit weights. Refused before loading."""
    method, folder = prequantized
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(make_recipe().read_text())
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    result = run_qtune_in_process("merge", run, "--base", folder, "--quantize", "4")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: --base: '{folder}' is already quantized ({method}" in result.stderr
    assert "merge --quantize 4 needs unquantized weights" in result.stderr
    assert not (run / "merged").exists()

    with pytest.raises(QtuneError, match=r"^MODEL: .* already quantized .*quantize --bits 8"):
        quantize(str(folder), 8, out=tmp_path / "q8")
    assert not (tmp_path / "q8").exists()


def _fake_run(tmp_path, make_recipe, **sections):
    """A run directory with a recipe and an empty adapter: enough for merge's checks before anything loads."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(make_recipe(**sections).read_text())
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return run


def test_merge_onto_dequantized_of_an_8bit_bnb_run_refused(make_recipe, tmp_path):
    """bnb's table entry dequantizes 4-bit weights exactly, not LLM.int8 ones: said before anything loads."""
    from qtune.merging import merge

    run = _fake_run(tmp_path, make_recipe, quantization={"bits": 8})
    with pytest.raises(QtuneError) as info:
        merge(run)
    assert info.value.message == (
        "merge --onto dequantized: the run trained on an 8-bit base; only 4-bit bases are dequantized exactly"
    )
    assert info.value.hint == "use --onto original" and not (run / "merged").exists()


def test_merge_of_a_gptq_run_needs_its_gptq_checkpoint(make_recipe, prequantized, tiny_llama, tmp_path):
    """--onto dequantized dequantizes the GPTQ checkpoint the run trained on: plain weights, another method or
    other bits as --base are refused; --onto original needs the unquantized checkpoint as --base."""
    method, folder = prequantized
    run = _fake_run(tmp_path, make_recipe, model={"name": str(folder)}, quantization={"backend": "gptq", "bits": 4})
    result = run_qtune_in_process("merge", run, "--base", tiny_llama)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: --base: '{tiny_llama}' is plain weights (no quantization_config); the run trained LoRA on a " in (
        result.stderr
    )
    assert "4-bit GPTQ checkpoint (quantization.backend: gptq)" in result.stderr
    result = run_qtune_in_process("merge", run, "--onto", "original")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"'{folder}' is already quantized ({method}); merge --onto original needs unquantized weights" in (
        result.stderr
    )
    if method != "gptq":
        result = run_qtune_in_process("merge", run)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"'{folder}' is a {method} checkpoint (4-bit); the run trained LoRA on a 4-bit GPTQ" in result.stderr
    assert not (run / "merged").exists()


# --------------------------------------------------------------------------- backend gptq: a GPTQ checkpoint as the base


def _installed(*modules: str) -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:
        return False


needs_gptq = pytest.mark.skipif(
    not _installed("optimum.gptq", "gptqmodel"), reason="needs qtune[gptq] (optimum + gptqmodel)"
)

# GPTQ-quantize the tiny llama the way the issue describes (transformers' GPTQConfig with a few calibration
# strings). In a subprocess: importing gptqmodel sets process-wide environment variables. group_size 32 divides
# every layer's input width (64, 128); the gptq_torch kernel and GPTQMODEL_DISABLE_PACK_EXT skip the C++ kernels
# GPT-QModel would otherwise JIT-compile on first use (~2 minutes).
QUANTIZE_GPTQ = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig
src, out, bits = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(src)
data = ["what is the sum of one plus two ? three", "spell the number 1234 : one two three four",
        "hello world , say yes or no", "count the letters of the word reverse"] * 4
config = GPTQConfig(bits=bits, group_size=32, dataset=data, tokenizer=tokenizer, backend="gptq_torch")
model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=torch.float32)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
"""


@pytest.fixture(scope="session")
def tiny_gptq(tiny_llama, tmp_path_factory):
    """bits → a GPTQ checkpoint of the tiny llama (made once per session and bits)."""
    import subprocess
    import sys

    made = {}

    def make(bits: int):
        if bits not in made:
            out = tmp_path_factory.mktemp("models") / f"tiny-llama-gptq-{bits}bit"
            result = subprocess.run(
                [sys.executable, "-c", QUANTIZE_GPTQ, str(tiny_llama), str(out), str(bits)],
                env={**os.environ, "GPTQMODEL_DISABLE_PACK_EXT": "1"},
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, result.stderr[-3000:]
            config = json.loads((out / "config.json").read_text())["quantization_config"]
            assert config["quant_method"] == "gptq" and config["bits"] == bits
            made[bits] = out
        return made[bits]

    return make


@needs_gptq
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_layers_are_quantized_under_lora(make_recipe, tiny_gptq, bits):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from peft.tuners.lora.gptq import GPTQLoraLinear

    recipe = load_recipe(
        make_recipe(model={"name": str(tiny_gptq(bits))}, quantization={"backend": "gptq", "bits": bits})
    )
    check_architecture(recipe)
    model = load_for_training(recipe, SINGLE, load_tokenizer(recipe), verbose=False)
    lora_layers = [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    assert len(lora_layers) == 2 * 7  # all-linear: every quantized layer by name (peft's all-linear misses them)
    for layer in lora_layers:
        assert isinstance(layer, GPTQLoraLinear)
        base = layer.base_layer
        assert isinstance(base, BaseQuantLinear) and type(base).__name__ == "TorchLinear"  # the gptq_torch kernel
        assert base.bits == bits and base.qweight.dtype == torch.int32 and not base.qweight.requires_grad
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and ".lora_" not in n]
    assert [n.rsplit(".", 1)[-1] for n in plain] == ["lm_head"]


@needs_gptq
@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_train_then_merge(make_recipe, tiny_gptq, tiny_llama, tmp_path, bits):
    """The issue's path: a GPTQ checkpoint trains 2 steps through qtune, then merges onto its dequantized layers
    (each QuantLinear's dequantize_weight()), verified against the adapter on the GPTQ base."""
    recipe = make_recipe(
        model={"name": str(tiny_gptq(bits))}, quantization={"backend": "gptq", "bits": bits}, training={"max_steps": 2}
    )
    result = run_qtune_in_process("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{bits}-bit gptq (pre-quantized checkpoint" in result.stdout + result.stderr
    assert "You passed `quantization_config`" not in result.stderr
    run = tmp_path / "run"
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert len(lora_b) == 14 and all(t.abs().max() > 0 for t in lora_b), "lora_B starts at zero: must change"

    report, merged = merge_and_check(run)
    print(f"gptq {bits}-bit merge (dequantized, fp32) vs adapter on the GPTQ base: {report['vs_trained']}")
    assert not any("qweight" in name or "scales" in name for name in merged)

    if bits == 4:  # onto the unquantized checkpoint the GPTQ one was made from
        result = run_qtune_in_process(
            "merge", run, "--onto", "original", "--base", tiny_llama, "--out", tmp_path / "orig"
        )
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((tmp_path / "orig" / "qtune_merge.json").read_text())
        print(f"gptq 4-bit merge --onto original: vs trained {report['vs_trained']}, checked {report['checked']}")
        assert report["checked"]["max_diff"] <= 1e-4 * max(1.0, report["checked"]["scale"])


@needs_gptq
@pytest.mark.slow
def test_gptq_trains_on_a_bf16_load(make_recipe, tiny_gptq, tmp_path):
    recipe = make_recipe(
        model={"name": str(tiny_gptq(4)), "dtype": "bfloat16"},
        quantization={"backend": "gptq", "bits": 4},
        training={"max_steps": 2},
    )
    result = run_qtune_in_process("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)
    result = run_qtune_in_process("merge", tmp_path / "run", "--dtype", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "merged" / "qtune_merge.json").read_text())
    print(f"gptq 4-bit bf16 load, merge --dtype bf16: {report['vs_trained']}")
    assert report["vs_trained"]["top1"] >= 0.95
