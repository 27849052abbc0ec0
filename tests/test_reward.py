"""Reward modelling (issue #16, method: reward): a sequence-classification head (score) + LoRA on the 4-bit base,
trained on preference pairs with TRL's RewardTrainer; the adapter (with the head) loads with
AutoModelForSequenceClassification + peft; runs that do not generate are refused by chat, merge and export-gguf."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from test_dpo import SINGLE, _recipe_file, digit_pairs, last_digit_pairs

from qtune import training
from qtune.config import load_recipe
from qtune.errors import QtuneError

# --------------------------------------------------------------------------- (a) the method and its section


def test_reward_section_gets_its_defaults_and_builds_trls_reward_config(tmp_path):
    from trl import RewardConfig

    recipe = load_recipe(_recipe_file(tmp_path, method="reward"))
    assert recipe.reward.center_rewards_coefficient is None
    assert all(getattr(recipe, m) is None for m in ("dpo", "kto", "orpo", "simpo"))
    args = training.trainer_config(
        load_recipe(_recipe_file(tmp_path, method="reward", reward={"center_rewards_coefficient": 0.01})), SINGLE
    )
    assert type(args) is RewardConfig and args.center_rewards_coefficient == 0.01
    row = training.METHODS["reward"]
    assert row.schemas == ("preference",) and not row.reference and not row.generates
    assert [m for m, r in training.METHODS.items() if not r.generates] == ["reward"]


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"method": "reward", "reward": {"center_rewards_coefficient": -1}}, "reward.center_rewards_coefficient"),
        ({"method": "reward", "reward": {"beta": 0.1}}, "unknown key 'reward.beta'"),
        ({"method": "dpo", "reward": {}}, "reward: settings for method reward, but method is dpo"),
        ({"method": "reward", "data": {"datasets": [{"path": "p.jsonl"}], "packing": True}}, "data: packing"),
        (
            {"method": "reward", "data": {"datasets": [{"path": "p.jsonl"}], "train_on": "all"}},
            "scores each whole chosen and rejected sequence (prompt included)",
        ),
    ],
)
def test_reward_section_is_strictly_validated(tmp_path, top, message):
    with pytest.raises(QtuneError, match=re.escape(message)):
        load_recipe(_recipe_file(tmp_path, **top))


def test_training_extra_is_checked_against_reward_config(tmp_path):
    recipe = load_recipe(_recipe_file(tmp_path, method="reward"))
    extra = recipe.training.model_copy(update={"extra": {"center_rewards_coefficient": 0.1}})
    with pytest.raises(QtuneError, match="already set by the recipe key reward.center_rewards_coefficient"):
        training.trainer_config(recipe.model_copy(update={"training": extra}), SINGLE)


# --------------------------------------------------------------------------- (b) data and refusals before loading


@pytest.fixture
def reward_recipe(tmp_path, tiny_llama):
    from conftest import write_jsonl

    def make(rows=None, model=None, **sections) -> str:
        data = write_jsonl(tmp_path / "pairs.jsonl", rows if rows is not None else digit_pairs(24))
        recipe = {
            "method": "reward",
            "model": {"name": str(model or tiny_llama)},
            "quantization": {"bits": 4},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"datasets": [{"path": str(data)}], "max_length": 64},
            "training": {"max_steps": 2, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "logging_steps": 1},
            "output_dir": str(tmp_path / "run"),
        }
        for key, value in sections.items():
            recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
        path = tmp_path / "reward.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return str(path)

    return make


@pytest.mark.parametrize("form", ["messages", "text"])
def test_qtune_data_shows_whole_sequences_as_trl_prepares_them(reward_recipe, form):
    from conftest import run_qtune_in_process

    result = run_qtune_in_process("data", reward_recipe(digit_pairs(12, form=form)), "--samples", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "schema: preference; REWARD scores each whole sequence" in out and "pairs: 12 train" in out
    assert "longer than max_length (TRL drops the pair): 0" in out
    assert "--- pair 1, chosen ---" in out and "--- pair 1, rejected ---" in out and "no loss" not in out


def test_pairs_longer_than_max_length_fail_loudly(reward_recipe):
    """TRL's RewardTrainer drops (does not cut) a pair longer than max_length: above data.max_untrained_share of
    the pairs, that is refused before any weight loads, naming the first pair."""
    from conftest import run_qtune_in_process

    result = run_qtune_in_process("train", reward_recipe(), "data.max_length=8")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "preference pairs (100.0%) are longer than data.max_length 8 tokens: TRL's RewardTrainer drops them" in (
        result.stderr
    )


def test_an_architecture_without_a_sequence_classification_class_is_refused(reward_recipe, tmp_path):
    """granite has a causal LM class but no sequence-classification one in transformers: one error line naming the
    architecture and what to use, exit 2, nothing written, no weights needed (config.json alone)."""
    from transformers import GraniteConfig

    from conftest import run_qtune_in_process

    folder = tmp_path / "granite"
    GraniteConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, architectures=["GraniteForCausalLM"]).save_pretrained(folder)  # fmt: skip
    result = run_qtune_in_process("train", reward_recipe(model=folder))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "method: reward needs a sequence-classification head" in errors[0]
    assert "model_type granite, GraniteForCausalLM" in errors[0]
    assert "Llama, Mistral, Qwen2" in result.stderr and "method dpo, orpo or simpo" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_causal_lm_adapter_cannot_start_a_reward_run(reward_recipe, tmp_path):
    from qtune.model import start_adapter

    folder = tmp_path / "sft-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    recipe = load_recipe(reward_recipe(), [f"model.adapter={folder}"])
    with pytest.raises(QtuneError, match="is a CAUSAL_LM adapter; method reward trains a sequence-classification"):
        start_adapter(recipe)


# --------------------------------------------------------------------------- (c) it learns; the adapter loads


@pytest.fixture(scope="module")
def wide_tiny_llama(tmp_path_factory):
    from qtune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-wide", initializer_range=0.1)


def _scores(model, tokenizer, pairs) -> list[tuple[float, float]]:
    """(score of prompt + chosen, score of prompt + rejected) per pair, one unpadded sequence at a time."""
    import torch

    out = []
    for pair in pairs:
        both = []
        for key in ("chosen", "rejected"):
            text = tokenizer.apply_chat_template(pair["prompt"] + pair[key], tokenize=False)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                both.append(model(input_ids=ids).logits[0, 0].float().item())
        out.append((both[0], both[1]))
    return out


def _accuracy(scores) -> float:
    return sum(c > r for c, r in scores) / len(scores)


@pytest.mark.slow
def test_reward_model_learns_to_rank_pairs_through_the_cli(tmp_path, wide_tiny_llama):
    """`qtune train` with method: reward on the last-digit pairs. Outside TRL, from the saved adapter loaded with
    AutoModelForSequenceClassification + PeftModel: on held-out pairs the start (the base with the fresh score head)
    ranks near chance, the trained model >= 90%; on the run's eval split the scores equal TRL's at the end of
    training. chat, merge and export-gguf refuse the run with one line."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    from conftest import run_qtune_in_process, write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", last_digit_pairs(200, seed=1))
    held_out = last_digit_pairs(40, seed=2)
    recipe = {
        "method": "reward",
        "model": {"name": str(wide_tiny_llama)},
        "quantization": {"bits": 4},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"datasets": [{"path": str(data)}], "max_length": 32, "eval_split": 0.2},
        "training": {"max_steps": 100, "micro_batch_size": 16, "grad_accum": 1, "lr": 1e-2, "logging_steps": 10,
                     "eval_steps": 50},
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = run_qtune_in_process("train", path, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "method     reward, a score head (sequence classification, 1 label) + LoRA" in result.stdout
    assert "AutoModelForSequenceClassification" in result.stdout and "talk to the fine-tuned model" not in result.stdout

    run = tmp_path / "run"
    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.score.weight" in set(f.keys())
    assert not (adapter / "generation_config.json").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in records if "eval_accuracy" in r][-1]

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    loaded = load_recipe(run / "recipe.yaml")
    from qtune.quant import quantization_config

    nf4 = quantization_config(loaded, SINGLE)  # the run's own 4-bit config: the base exactly as trained

    set_seed(loaded.training.seed)  # the score head's draw at the start of training
    start = AutoModelForSequenceClassification.from_pretrained(
        wide_tiny_llama, num_labels=1, quantization_config=nf4, dtype=torch.float32
    ).eval()
    before = _accuracy(_scores(start, tokenizer, held_out))
    base = AutoModelForSequenceClassification.from_pretrained(
        wide_tiny_llama, num_labels=1, quantization_config=nf4, dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    after = _accuracy(_scores(model, tokenizer, held_out))
    print(f"held-out ranking accuracy: start {before:.0%}, trained {after:.0%}; TRL eval accuracy "
          f"{final_eval['eval_accuracy']:.0%}")  # fmt: skip
    assert 0.2 <= before <= 0.8, before
    assert after >= 0.9, (before, after)

    # the same scores as at the end of training: TRL's final eval pass over the run's eval split
    from qtune import pipeline
    from qtune.data.cache import build_dataset

    prepared = pipeline.prepare(loaded, SINGLE, training=False)
    split = build_dataset(loaded, prepared.tokenizer, prepared.fmt, prepared.rows, prepared.args)["eval"]
    scores = _scores(model, tokenizer, [split[i] for i in range(len(split))])
    size = loaded.training.micro_batch_size  # TRL's eval metrics: per eval batch (in order), averaged
    batches = [scores[i : i + size] for i in range(0, len(scores), size)]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert mean([_accuracy(b) for b in batches]) == pytest.approx(final_eval["eval_accuracy"], abs=1e-6)
    assert mean([mean([c - r for c, r in b]) for b in batches]) == pytest.approx(final_eval["eval_margin"], abs=1e-3)
    for name, of in (("min", min), ("max", max), ("mean", mean)):
        expected = final_eval[f"eval_{name}_reward"]
        assert mean([of([x for pair in b for x in pair]) for b in batches]) == pytest.approx(expected, abs=1e-4), name

    # a reward model does not generate: chat, merge and export-gguf refuse it, one error line, nothing written
    for command in (["chat", str(run), "--prompt", "hi"], ["merge", str(run)], ["export-gguf", str(run), "--out",
                    str(tmp_path / "m.gguf")]):  # fmt: skip
        refused = run_qtune_in_process(*command)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert refused.returncode == 2 and len(errors) == 1, (command, refused.stderr)
        assert "is a reward model (method: reward)" in errors[0]
        assert "AutoModelForSequenceClassification" in refused.stderr
    assert not (run / "merged").exists() and not (tmp_path / "m.gguf").exists()
