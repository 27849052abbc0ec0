"""Preference tuning (issue #16), DPO first: the method key and its section, preference data, starting from an
adapter with the reference as the starting policy, and a DPO run that learns a rule."""

from __future__ import annotations

import re

import pytest
import yaml

from qtune import train
from qtune.config import DPO_LOSS_TYPES, load_recipe
from qtune.errors import QtuneError
from qtune.model import Launch

SINGLE = Launch(world_size=1, rank=0, local_rank=0, distributed_type="NO")


def _recipe_file(tmp_path, **top) -> str:
    recipe = {"model": {"name": "some/model"}, "data": {"datasets": [{"path": "pairs.jsonl"}]}, **top}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- (a) the method key and its section


def test_method_defaults_to_sft_without_a_dpo_section(tmp_path):
    recipe = load_recipe(_recipe_file(tmp_path))
    assert recipe.method == "sft" and recipe.dpo is None


def test_dpo_section_gets_its_defaults(tmp_path):
    recipe = load_recipe(_recipe_file(tmp_path, method="dpo"))
    assert recipe.dpo.beta == 0.1 and recipe.dpo.loss_type == "sigmoid"


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo", "reward"])
def test_planned_methods_are_refused_as_not_yet(tmp_path, method):
    with pytest.raises(QtuneError, match=f"method: {method} is not yet supported"):
        load_recipe(_recipe_file(tmp_path, method=method))


def test_unknown_method_lists_the_methods(tmp_path):
    with pytest.raises(QtuneError, match="method: Input should be 'sft', 'dpo'"):
        load_recipe(_recipe_file(tmp_path, method="ppo"))


def test_a_section_for_another_method_is_an_error_that_says_so(tmp_path):
    with pytest.raises(QtuneError) as err:
        load_recipe(_recipe_file(tmp_path, dpo={"beta": 0.2}))
    assert "r.yaml:" in err.value.message and "dpo: settings for method dpo, but method is sft" in err.value.message


@pytest.mark.parametrize(
    ("dpo", "message"),
    [
        ({"beta": 0}, "dpo.beta: Input should be greater than 0"),
        ({"betta": 0.1}, "unknown key 'dpo.betta'"),
        ({"loss_type": "sigmoidd"}, "dpo.loss_type"),
        ({"loss_type": []}, "give at least one loss type"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "1 weight(s) for 2 loss type(s)"),
        ({"loss_type": "exo_pair"}, "exo_pair needs label_smoothing > 0"),
        ({"label_smoothing": 0.5}, "dpo.label_smoothing"),
    ],
)
def test_dpo_section_is_strictly_validated(tmp_path, dpo, message):
    with pytest.raises(QtuneError, match=re.escape(message)):
        load_recipe(_recipe_file(tmp_path, method="dpo", dpo=dpo))


@pytest.mark.parametrize(("data", "message"), [({"packing": True}, "packing"), ({"train_on": "all"}, "train_on")])
def test_dpo_refuses_sft_only_data_settings(tmp_path, data, message):
    path = _recipe_file(tmp_path, method="dpo")
    with pytest.raises(QtuneError, match=f"data: {message}"):
        load_recipe(path, [f"data.{k}={str(v).lower()}" for k, v in data.items()])


def test_dpo_loss_types_are_trls():
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(re.findall(r"`'(\w+)'`", help_text)) == set(DPO_LOSS_TYPES)


def test_method_table_builds_each_methods_trl_config(tmp_path):
    """One table: method → TRL config class; the method section reaches DPOConfig, SFT stays SFTConfig."""
    from trl import DPOConfig, SFTConfig

    sft = load_recipe(_recipe_file(tmp_path), [f"output_dir={tmp_path / 'a'}"])
    assert type(train.trainer_config(sft, SINGLE)) is SFTConfig
    dpo = load_recipe(
        _recipe_file(tmp_path, method="dpo"),
        [f"output_dir={tmp_path / 'b'}", "dpo.beta=0.25", "dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1, 0.5]"],
    )
    args = train.trainer_config(dpo, SINGLE)
    assert type(args) is DPOConfig
    assert (args.beta, args.loss_type, args.loss_weights, args.max_length) == (0.25, ["sigmoid", "sft"], [1, 0.5], 2048)
    assert set(train.METHODS) == {"sft", "dpo"}


def test_training_extra_is_checked_against_the_methods_config(tmp_path):
    dpo = load_recipe(_recipe_file(tmp_path, method="dpo"), [f"output_dir={tmp_path / 'b'}"])
    with pytest.raises(QtuneError, match="DPOConfig has no argument 'packing'"):
        train.trainer_config(
            dpo.model_copy(update={"training": dpo.training.model_copy(update={"extra": {"packing": 1}})}), SINGLE
        )
    extra = dpo.training.model_copy(update={"extra": {"beta": 0.3}})
    with pytest.raises(QtuneError, match="already set by the recipe key dpo.beta"):
        train.trainer_config(dpo.model_copy(update={"training": extra}), SINGLE)
    extra = dpo.training.model_copy(update={"extra": {"f_divergence_type": "js_divergence"}})
    assert train.trainer_config(dpo.model_copy(update={"training": extra}), SINGLE).f_divergence_type == "js_divergence"


# --------------------------------------------------------------------------- (b) preference data

WORDS = "zero one two three four five six seven eight nine".split()


def digit_pairs(n: int, seed: int = 0, form: str = "messages") -> list[dict]:
    """The rule: asked for the word of a digit, the right word is preferred to another digit's word."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        d = rng.randrange(10)
        wrong = rng.choice([w for w in range(10) if w != d])
        prompt = f"say the word of {d}"
        if form == "messages":
            user = [{"role": "user", "content": prompt}]
            rows.append(
                {
                    "prompt": user,
                    "chosen": [{"role": "assistant", "content": WORDS[d]}],
                    "rejected": [{"role": "assistant", "content": WORDS[wrong]}],
                }
            )
        elif form == "implicit":  # UltraFeedback-binarized: whole conversations, a text prompt and extra columns
            user = {"role": "user", "content": prompt}
            chosen = [user, {"role": "assistant", "content": WORDS[d]}]
            rows.append(
                {
                    "prompt": prompt,
                    "prompt_id": str(rng.random()),
                    "chosen": chosen,
                    "rejected": [user, {"role": "assistant", "content": WORDS[wrong]}],
                    "messages": chosen,
                    "score_chosen": 9.0,
                    "score_rejected": 2.0,
                }
            )
        else:
            rows.append({"prompt": prompt + " :", "chosen": " " + WORDS[d], "rejected": " " + WORDS[wrong]})
    return rows


def test_preference_rows_in_every_form_map_to_prompt_chosen_rejected():
    from qtune.data.formats import detect_format, map_row

    user = [{"role": "user", "content": "say the word of 3"}]
    for form in ("messages", "implicit", "text"):
        row = digit_pairs(1, form=form)[0]
        assert detect_format(list(row), row, "f") == "preference"
        mapped = map_row(row, "preference", {})
        assert set(mapped) == {"prompt", "chosen", "rejected"}
        if form != "text":
            assert mapped["prompt"][0]["role"] == "user" and mapped["chosen"][0]["role"] == "assistant"
    implicit = map_row(digit_pairs(1, form="implicit")[0], "preference", {})
    assert implicit == map_row(digit_pairs(1, form="messages")[0], "preference", {})
    # implicit text: the shared prefix is the prompt (TRL's extract_prompt)
    mapped = map_row({"chosen": "say 3 : three", "rejected": "say 3 : four"}, "preference", {})
    assert mapped == {"prompt": "say 3 :", "chosen": " three", "rejected": " four"}
    assert user[0]["content"] == "say the word of 3"


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "both be text"),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
            },
            "share no prompt",
        ),
        (
            {
                "prompt": "another question",
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "y"}],
            },
            "'prompt' differs",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "a"}],
                "chosen": [{"role": "user", "content": "x"}],
                "rejected": [{"role": "assistant", "content": "y"}],
            },
            "'chosen' must start with the assistant",
        ),
    ],
)
def test_bad_preference_rows_are_refused(row, why):
    from qtune.data.formats import BadRow, map_row

    with pytest.raises(BadRow, match=why):
        map_row(row, "preference", {})


@pytest.fixture
def pairs_recipe(tmp_path, tiny_llama):
    from conftest import write_jsonl

    def make(rows=None, **sections) -> str:
        data = write_jsonl(tmp_path / "pairs.jsonl", rows if rows is not None else digit_pairs(24))
        recipe = {
            "method": "dpo",
            "model": {"name": str(tiny_llama)},
            "quantization": {"bits": 4},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"datasets": [{"path": str(data)}], "max_length": 64},
            "training": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "logging_steps": 2},
            "output_dir": str(tmp_path / "run"),
        }
        for key, value in sections.items():
            recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
        path = tmp_path / "dpo.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return str(path)

    return make


@pytest.mark.parametrize("form", ["messages", "implicit", "text"])
def test_qtune_data_shows_pairs_as_trl_prepares_them(pairs_recipe, form):
    from conftest import run_qtune_in_process

    result = run_qtune_in_process("data", pairs_recipe(digit_pairs(12, form=form)), "--samples", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "format preference (detected), 12 rows" in out and "pairs: 12 train" in out
    chosen = out.split("--- pair 1, chosen ([prompt: no loss]) ---\n")[1].split("--- pair 1, rejected")[0]
    prompt_part, scored = chosen.split("]", 1)
    assert "say the word of" in prompt_part and "say" not in scored  # the prompt is masked, only the answer scored
    if form != "text":
        assert "<|im_end|>" in scored  # the chat template's end of turn is scored with the answer


def test_chosen_identical_to_rejected_names_file_and_row(pairs_recipe):
    from conftest import run_qtune_in_process

    rows = digit_pairs(8)
    rows[5]["rejected"] = rows[5]["chosen"]
    result = run_qtune_in_process("data", pairs_recipe(rows))
    assert result.returncode == 2
    assert "pairs.jsonl: row 6: 'chosen' and 'rejected' are identical" in result.stderr


def test_a_prompt_truncated_away_fails_loudly(pairs_recipe):
    from conftest import run_qtune_in_process

    rows = digit_pairs(8)
    rows[2]["prompt"][0]["content"] = "say " * 80 + "the word of 3"
    result = run_qtune_in_process("data", pairs_recipe(rows))
    assert result.returncode == 2
    assert "1 of 8 preference pairs (12.5%) have a prompt of data.max_length 64 tokens or more" in result.stderr
    assert "pairs.jsonl: row 3" in result.stderr
    # training refuses it too, before any weight loads
    result = run_qtune_in_process("train", pairs_recipe(rows))
    assert result.returncode == 2 and "no chosen or rejected token to score" in result.stderr


def test_method_and_data_must_match(pairs_recipe, chat_data):
    from conftest import run_qtune_in_process

    result = run_qtune_in_process("data", pairs_recipe(), "method=sft")
    assert result.returncode == 2 and "preference pairs (prompt / chosen / rejected) but method is sft" in result.stderr
    result = run_qtune_in_process("data", pairs_recipe(), f"data.datasets.0.path={chat_data}")
    assert result.returncode == 2 and "method dpo trains on preference rows; the data maps to messages" in result.stderr


# --------------------------------------------------------------------------- (c) start from an adapter


@pytest.fixture(scope="module")
def start_adapter_dir(tmp_path_factory, tiny_llama) -> str:
    """An adapter that changes the model (random, non-zero B), saved as peft saves one: the starting policy."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    out = tmp_path_factory.mktemp("start") / "adapter"
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


def _completion_logps(model, batch):
    """Sum of log p(token) over the completion tokens, computed here from plain logits (not TRL's code)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    scored = batch["completion_mask"][:, 1:].bool()
    per_token = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (per_token * scored).sum(-1)


def test_reference_is_the_starting_policy_at_step_0(pairs_recipe, start_adapter_dir):
    """DPO from model.adapter: TRL's reference log-probs (the frozen "ref" adapter on the same 4-bit base) equal the
    starting adapter's, computed independently (qtune's own load of base + adapter), and the trainable policy starts
    as exactly that adapter; the reference is not the bare base."""
    import torch

    from qtune import pipeline
    from qtune.data.cache import build_dataset
    from qtune.model import load_for_training, load_trained

    recipe = load_recipe(pairs_recipe(), [f"model.adapter={start_adapter_dir}"])
    prepared = pipeline.prepare(recipe, SINGLE)
    model = load_for_training(recipe, SINGLE, prepared.tokenizer, verbose=False)
    dataset = build_dataset(recipe, prepared.tokenizer, prepared.fmt, prepared.rows, prepared.args)
    trainer = train.build_trainer(prepared, model, dataset)
    assert set(trainer.model.peft_config) == {"default", "ref"}
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    trl_ref = torch.cat([ref_chosen, ref_rejected])

    start = load_trained(recipe, start_adapter_dir)  # the starting policy, loaded on its own
    independent = _completion_logps(start, batch)
    torch.testing.assert_close(trl_ref.float(), independent, rtol=0, atol=1e-4)

    policy = _completion_logps(trainer.model, batch)  # the trainable adapter at step 0
    torch.testing.assert_close(policy, independent, rtol=0, atol=1e-4)
    from safetensors.torch import load_file

    saved = load_file(f"{start_adapter_dir}/adapter_model.safetensors")
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(saved)
    for name, param in trainable.items():
        assert torch.equal(param.detach(), saved[name.replace(".default", "")].float()), name

    with start.disable_adapter():
        bare = _completion_logps(start, batch)
    assert (bare - independent).abs().max() > 0.05, "the starting adapter should change the log-probs"


def test_without_a_start_adapter_the_reference_is_the_base(pairs_recipe):
    import torch

    from qtune import pipeline
    from qtune.data.cache import build_dataset
    from qtune.model import load_base, load_for_training

    recipe = load_recipe(pairs_recipe())
    prepared = pipeline.prepare(recipe, SINGLE)
    model = load_for_training(recipe, SINGLE, prepared.tokenizer, verbose=False)
    dataset = build_dataset(recipe, prepared.tokenizer, prepared.fmt, prepared.rows, prepared.args)
    trainer = train.build_trainer(prepared, model, dataset)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trl_ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    torch.testing.assert_close(trl_ref.float(), _completion_logps(load_base(recipe).eval(), batch), rtol=0, atol=1e-4)


def test_model_adapter_is_checked_before_weights_load(pairs_recipe, start_adapter_dir, tmp_path):
    import json
    import shutil

    from conftest import run_qtune_in_process

    result = run_qtune_in_process("train", pairs_recipe(), f"model.adapter={tmp_path / 'nowhere'}")
    assert result.returncode == 2 and "is neither a qtune run directory" in result.stderr
    other = tmp_path / "other"
    shutil.copytree(start_adapter_dir, other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (other / "adapter_config.json").write_text(json.dumps(config))
    result = run_qtune_in_process("train", pairs_recipe(), f"model.adapter={other}")
    assert result.returncode == 2 and "was trained on meta-llama/Llama-2-7b-hf" in result.stderr


def test_model_adapter_takes_a_run_dir(pairs_recipe, start_adapter_dir, tmp_path):
    import shutil

    from qtune.config import dump_recipe
    from qtune.model import start_adapter

    run = tmp_path / "sft-run"
    shutil.copytree(start_adapter_dir, run / "adapter")
    dump_recipe(load_recipe(pairs_recipe(), ["method=sft", "dpo=null"]), run / "recipe.yaml")
    recipe = load_recipe(pairs_recipe(), [f"model.adapter={run}"])
    assert start_adapter(recipe) == str(run / "adapter")
    assert start_adapter(load_recipe(pairs_recipe(), [f"model.adapter={start_adapter_dir}"])) == start_adapter_dir
    assert start_adapter(load_recipe(pairs_recipe(), ["model.adapter=org/some-adapter"])) == "org/some-adapter"
