"""Every shipped recipe validates, and its training arguments build (TRL checks optimizer/scheduler names)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtune import training
from qtune.config import load_recipe
from qtune.model import Launch

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_the_shipped_set():
    names = {p.name for p in RECIPES}
    assert {"llama2-qlora.yaml", "llama3.1-8b-qlora.yaml", "mistral-7b-qlora.yaml", "qwen2.5-7b-qlora.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_builds_sft_config(path, tmp_path):
    recipe = load_recipe(path, [f"output_dir={tmp_path / 'run'}"])
    assert recipe.quantization.bits == 4 and recipe.quantization.quant_type == "nf4"
    args = training.trainer_config(recipe, Launch(1, 0, 0, "NO"))
    assert args.learning_rate == recipe.training.lr
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_llama2_recipe_follows_the_qlora_paper():
    r = load_recipe(RECIPES[0].parent / "llama2-qlora.yaml")
    assert r.model.name == "meta-llama/Llama-2-7b-hf"
    assert (r.quantization.double_quant, r.quantization.compute_dtype) == (True, "bfloat16")
    assert (r.lora.r, r.lora.alpha, r.lora.target_modules) == (64, 16, "all-linear")
    assert r.training.optimizer.startswith("paged_adamw") and r.training.lr == 2e-4


def test_zephyr_dpo_recipe_continues_the_sft_adapter():
    from trl import DPOConfig

    r = load_recipe(RECIPES[0].parent / "zephyr-7b-dpo-qlora.yaml")
    assert r.method == "dpo" and r.model.adapter == r.model.tokenizer == "alignment-handbook/zephyr-7b-sft-qlora"
    assert r.data.chat_template is None  # the SFT adapter's tokenizer carries the template it trained with
    assert (r.training.micro_batch_size, r.training.grad_accum, r.training.seed) == (4, 1, 42)
    assert (r.dpo.beta, r.training.lr, r.data.max_length) == (0.01, 5e-6, 1024)
    args = training.trainer_config(r, Launch(1, 0, 0, "NO"))
    assert type(args) is DPOConfig and args.beta == 0.01 and args.loss_type == ["sigmoid"]


def test_llama31_orpo_recipe_follows_its_source():
    """recipes/llama3.1-8b-orpo.yaml: ORPO after the named post (its header), building TRL's ORPOConfig."""
    r = load_recipe(RECIPES[0].parent / "llama3.1-8b-orpo.yaml")
    assert r.method == "orpo" and r.model.name == "meta-llama/Llama-3.1-8B" and r.model.adapter is None
    assert (r.orpo.beta, r.training.lr, r.data.max_length, r.data.chat_template) == (0.1, 8e-6, 1024, "llama-3.1")
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (16, 32, 0.05)
    assert (r.training.micro_batch_size, r.training.grad_accum, r.training.optimizer) == (2, 4, "paged_adamw_8bit")
    args = training.trainer_config(r, Launch(1, 0, 0, "NO"))
    assert type(args).__name__ == "ORPOConfig" and args.beta == 0.1 and args.lr_scheduler_type == "linear"
    header = (RECIPES[0].parent / "llama3.1-8b-orpo.yaml").read_text().split("\nmethod:")[0]
    assert "huggingface.co/blog/mlabonne/orpo-llama-3" in header and "arXiv:2403.07691" in header


def test_every_recipe_names_a_chat_template_qtune_has():
    from qtune.data.templates import BUILTINS

    for path in RECIPES:
        template = load_recipe(path).data.chat_template
        assert template is None or template in BUILTINS or "{%" in template, (path.name, template)
