"""Training through TRL: weights that should move do, weights that should not do not; the run directory."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_qtune, run_qtune_in_process, spell_rows, write_jsonl
from qtune import pipeline, training
from qtune.config import load_recipe
from qtune.data.cache import build_dataset
from qtune.model import Launch, load_for_training

SINGLE = Launch(world_size=1, rank=0, local_rank=0, distributed_type="NO")
pytestmark = pytest.mark.slow


def _quantized_bytes(model) -> dict[str, torch.Tensor]:
    """The frozen base as stored: packed 4-bit data and (double-quantized) absmax of every layer."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[name] = module.weight.data.clone()
            out[name + ".absmax"] = module.weight.quant_state.absmax.clone()
    return out


def test_lora_weights_change_and_quantized_base_does_not(make_recipe):
    recipe = load_recipe(make_recipe(), ["training.max_steps=6"])
    prepared = pipeline.prepare(recipe, SINGLE)
    model = load_for_training(recipe, SINGLE, prepared.tokenizer, verbose=False)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base_before = _quantized_bytes(model)
    assert len(base_before) == 2 * 2 * 7  # weight + absmax for 14 layers
    dataset = build_dataset(recipe, prepared.tokenizer, prepared.fmt, prepared.rows, prepared.args)
    training.run_training(prepared, model, dataset)

    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert len(changed) == len(lora_before), "every LoRA matrix should have moved"
    base_after = _quantized_bytes(model)
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cli_run_writes_adapter_and_resolved_recipe(make_recipe, tiny_llama, tiny_qwen, tmp_path, arch):
    model_dir = tiny_llama if arch == "llama" else tiny_qwen
    recipe_path = make_recipe(model={"name": str(model_dir)}, data={"eval_split": 0.25})
    result = run_qtune("train", recipe_path, "training.lr=3e-3", "lora.r=4")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    adapter = run_dir / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], names
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # trained (lora_B starts at 0)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"

    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["training"]["lr"] == 3e-3 and resolved["lora"]["r"] == 4
    assert resolved["quantization"] == {
        "backend": "bnb",
        "bits": 4,
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "auto",
        "quant_storage": None,
    }
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_loss"] is not None
    assert "trainable" in result.stdout and "4-bit NF4 + double quant" in result.stdout


@pytest.mark.parametrize("fmt", ["prompt_completion", "text"])
def test_other_row_formats_train(make_recipe, tmp_path, fmt):
    rows = write_jsonl(tmp_path / f"{fmt}.jsonl", spell_rows(32, fmt=fmt))
    result = run_qtune_in_process(
        "train", make_recipe(data={"datasets": [{"path": str(rows)}]}), "training.max_steps=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_8bit_and_unquantized_train(make_recipe, tmp_path):
    for bits, out in (("8", "run8"), ("null", "run16")):
        result = run_qtune_in_process(
            "train", make_recipe(), f"quantization.bits={bits}", f"output_dir={tmp_path / out}"
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / out / "adapter" / "adapter_model.safetensors").is_file()


def test_earlier_run_refused_then_overwritten_then_resumed(make_recipe, tmp_path):
    recipe_path = make_recipe(training={"save_steps": 2})
    assert run_qtune_in_process("train", recipe_path).returncode == 0
    adapter = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    first = adapter.read_bytes()

    refused = run_qtune_in_process("train", recipe_path)
    assert refused.returncode == 2 and "already holds an earlier run" in refused.stderr
    assert adapter.read_bytes() == first

    resumed = run_qtune_in_process("train", recipe_path, "--resume", "training.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6

    again = run_qtune_in_process("train", recipe_path, "--overwrite", "training.lr=5e-3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert adapter.read_bytes() != first
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["training"]["lr"] == 5e-3


def test_console_script_and_module_agree(make_recipe, tmp_path):
    """`qtune` (console script) and `python -m qtune` are the same entry point."""
    import shutil
    import subprocess

    exe = shutil.which("qtune")
    assert exe, "pip install -e . should put the qtune console script on PATH"
    recipe = make_recipe()
    via_script = subprocess.run([exe, "train", str(recipe), "--check"], capture_output=True, text=True, timeout=300)
    via_module = run_qtune("train", recipe, "--check")
    assert via_script.returncode == via_module.returncode == 0, via_script.stderr + via_module.stderr
    assert "is ready: 64 messages rows" in via_script.stdout and via_script.stdout == via_module.stdout
    assert not (tmp_path / "run").exists()  # --check writes nothing


@pytest.mark.parametrize("method", [m for m in training.METHODS if m != "sft"])
def test_each_method_sets_exactly_the_trl_arguments_its_row_names(method):
    """A method's TRL arguments come from its row's `named` map (training._section_settings): each named section key
    is a real field of the section, and every argument set is named, so `training.extra` collisions are all caught."""
    section = {"grpo": {"rewards": [{"name": "accuracy"}]}, "rloo": {"rewards": [{"name": "accuracy"}]}}.get(method, {})
    recipe = load_recipe(
        {"model": {"name": "org/m"}, "data": {"datasets": [{"path": "x.jsonl"}]}, "output_dir": "/tmp/o"}
        | {"method": method}
        | ({method: section} if section else {})
    )
    row = training.METHODS[method]
    settings = row.settings(recipe)
    assert set(settings) == set(row.named), set(settings) ^ set(row.named)
    fields = type(getattr(recipe, method)).model_fields
    for arg, key in row.named.items():
        field = key.removeprefix(f"{method}.")
        if field.isidentifier():
            assert field in fields, f"{method}: {arg} is named as {key}, which the {method} section lacks"
            assert settings[arg] == getattr(getattr(recipe, method), field) or arg == "loss_type"
