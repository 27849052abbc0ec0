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


GSM8K_ROW = {  # the shape of openai/gsm8k (main): a question and a worked solution ending "#### <answer>"
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How "
    "many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
    "in April and May.\n#### 72",
}


def test_qwen25_grpo_gsm8k_recipe_follows_its_source(tmp_path):
    """recipes/qwen2.5-3b-grpo-gsm8k.yaml: GRPO after the named notebook (its header), building TRL's GRPOConfig; its
    rewards score GSM8K-shaped rows as the notebook's correctness and format rewards do; its data mapping makes chats
    with the system prompt from question / answer columns; the estimate counts generation."""
    from qtune import estimate
    from qtune.data.loading import load_rows
    from qtune.rewards import completion_text

    path = RECIPES[0].parent / "qwen2.5-3b-grpo-gsm8k.yaml"
    r = load_recipe(path, [f"output_dir={tmp_path / 'run'}"])
    g = r.grpo
    assert r.method == "grpo" and r.model.name == "Qwen/Qwen2.5-3B-Instruct"
    assert (r.lora.r, r.lora.alpha, g.num_generations, g.max_completion_length, r.data.max_length) == (
        64,
        64,
        8,
        200,
        256,
    )
    assert (r.training.lr, r.training.max_steps, r.training.micro_batch_size, r.training.max_grad_norm) == (
        5e-6,
        250,
        8,
        0.1,
    )
    source = r.data.datasets[0]
    assert (source.path, source.name, source.split, source.columns) == (
        "openai/gsm8k",
        "main",
        "train",
        {"prompt": "question"},
    )
    args = training.trainer_config(r, Launch(1, 0, 0, "NO"))
    assert type(args).__name__ == "GRPOConfig" and args.reward_weights == [2.0, 0.5] and args.adam_beta2 == 0.99
    assert (args.num_generations, args.max_completion_length, args.beta, args.loss_type) == (8, 200, 0.04, "grpo")
    assert args.optim == "adamw_8bit" and args.weight_decay == 0.1 and args.eval_on_start
    header = path.read_text().split("\nmethod:")[0]
    for source_name in ("nb/Qwen2.5_(3B)-GRPO.ipynb", "willccbb/", "arXiv:2402.03300", "What to expect"):
        assert source_name in header, source_name

    accuracy, fmt = training.reward_functions(r)
    good = "<reasoning>\n48 / 2 = 24, 48 + 24 = 72\n</reasoning>\n<answer>\n72\n</answer>\n"
    wrong = good.replace("<answer>\n72", "<answer>\n70")
    untagged = "Natalia sold 72 clips."
    completions = [good, wrong, untagged]
    prompts = [[{"role": "user", "content": GSM8K_ROW["question"]}]] * 3
    answers = [GSM8K_ROW["answer"]] * 3
    assert accuracy(prompts, completions, answer=answers) == [1.0, 0.0, 0.0]
    assert fmt(prompts, completions, answer=answers) == [1.0, 1.0, 0.0]

    local = tmp_path / "gsm8k.jsonl"  # the Hub split's columns, offline
    local.write_text("".join(__import__("json").dumps(GSM8K_ROW) + "\n" for _ in range(4)))
    fmt_name, rows = load_rows(load_recipe(path, [f"data.datasets.0.path={local}", "data.datasets.0.name=null"]))
    assert fmt_name == "prompt_only" and rows[0]["answer"] == GSM8K_ROW["answer"]
    assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user"]
    assert (
        "<reasoning>" in rows[0]["prompt"][0]["content"]
        and completion_text(rows[0]["prompt"][1:]) == GSM8K_ROW["question"]
    )

    e = estimate.from_recipe(r)
    assert e.generation == 2 * 36 * 2 * 128 * 8 * (256 + 200) * 4 and "generation (KV cache)" in e.render()
