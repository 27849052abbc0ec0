"""Preference tuning (issue #16), DPO first: the method key and its section, preference data, starting from an
adapter with the reference as the starting policy, and a DPO run that learns a rule."""

from __future__ import annotations

import re

import pytest
import yaml

from qtune import training
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
    assert type(training.trainer_config(sft, SINGLE)) is SFTConfig
    dpo = load_recipe(
        _recipe_file(tmp_path, method="dpo"),
        [f"output_dir={tmp_path / 'b'}", "dpo.beta=0.25", "dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1, 0.5]"],
    )
    args = training.trainer_config(dpo, SINGLE)
    assert type(args) is DPOConfig
    assert (args.beta, args.loss_type, args.loss_weights, args.max_length) == (0.25, ["sigmoid", "sft"], [1, 0.5], 2048)
    assert {"sft", "dpo"} <= set(training.METHODS)  # and kto, orpo, simpo (tests/test_kto.py)


def test_training_extra_is_checked_against_the_methods_config(tmp_path):
    dpo = load_recipe(_recipe_file(tmp_path, method="dpo"), [f"output_dir={tmp_path / 'b'}"])
    with pytest.raises(QtuneError, match="DPOConfig has no argument 'packing'"):
        training.trainer_config(
            dpo.model_copy(update={"training": dpo.training.model_copy(update={"extra": {"packing": 1}})}), SINGLE
        )
    extra = dpo.training.model_copy(update={"extra": {"beta": 0.3}})
    with pytest.raises(QtuneError, match="already set by the recipe key dpo.beta"):
        training.trainer_config(dpo.model_copy(update={"training": extra}), SINGLE)
    extra = dpo.training.model_copy(update={"extra": {"f_divergence_type": "js_divergence"}})
    assert (
        training.trainer_config(dpo.model_copy(update={"training": extra}), SINGLE).f_divergence_type == "js_divergence"
    )


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
    assert re.search(r"tokens per part: prompt p50 \d+, p90 \d+, max \d+; chosen p50 \d+, .*; rejected p50 \d+", out)
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


def test_pairs_that_differ_only_after_max_length_fail_loudly(pairs_recipe):
    from conftest import run_qtune_in_process

    rows = digit_pairs(8)
    shared = "one two three four five six seven eight nine ten " * 8  # well past max_length 64
    rows[4]["chosen"][0]["content"] = shared + "yes"
    rows[4]["rejected"][0]["content"] = shared + "no"
    result = run_qtune_in_process("data", pairs_recipe(rows))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "1 of 8 preference pairs (12.5%) have chosen and rejected answers that differ only after" in result.stderr
    assert "pairs.jsonl: row 5" in result.stderr
    shown = run_qtune_in_process("data", pairs_recipe(rows), "data.max_untrained_share=0.5")
    assert shown.returncode == 0 and "chosen = rejected once cut at max_length: 1" in shown.stdout


def test_sharegpt_preference_form_maps_to_message_pairs(pairs_recipe):
    from conftest import run_qtune_in_process

    rows = [
        {
            "system": "answer in one word",
            "conversations": [{"from": "human", "value": r["prompt"][0]["content"]}],
            "chosen": {"from": "gpt", "value": r["chosen"][0]["content"]},
            "rejected": {"from": "gpt", "value": r["rejected"][0]["content"]},
        }
        for r in digit_pairs(8)
    ]
    result = run_qtune_in_process("data", pairs_recipe(rows), "--samples", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "format preference (detected), 8 rows" in result.stdout
    chosen = result.stdout.split("--- pair 1, chosen ([prompt: no loss]) ---\n")[1].split("--- pair 1, rejected")[0]
    assert "answer in one word" in chosen.split("]", 1)[0]  # the system prompt is in the (unscored) prompt
    rows[3]["rejected"] = {"from": "gpt"}
    bad = run_qtune_in_process("data", pairs_recipe(rows))
    assert bad.returncode == 2 and "pairs.jsonl: row 4: rejected[0] needs 'from' and 'value'" in bad.stderr


def test_text_pairs_with_a_system_column_keep_the_system_prompt(pairs_recipe):
    from conftest import run_qtune_in_process

    rows = [
        {"system": "answer in one word", "question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in digit_pairs(8, form="text")
    ]  # the orca_dpo_pairs shape, its question mapped to the prompt
    recipe = pairs_recipe(rows)
    result = run_qtune_in_process("data", recipe, "--samples", "1", 'data.datasets.0.columns={"prompt": "question"}')
    assert result.returncode == 0, result.stderr[-2000:]
    chosen = result.stdout.split("--- pair 1, chosen ([prompt: no loss]) ---\n")[1].split("--- pair 1, rejected")[0]
    assert "answer in one word" in chosen.split("]", 1)[0] and "<|im_start|> system" in chosen


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


def test_a_continued_run_uses_the_tokenizer_saved_with_its_adapter(pairs_recipe, start_adapter_dir, tmp_path):
    """SFT -> DPO in one line: the starting adapter's tokenizer (its chat template, as the SFT run trained with it)
    is the one the DPO data is rendered with, not the base's."""
    import shutil

    from conftest import run_qtune_in_process
    from qtune.tiny import CHATML_TEMPLATE, build_tokenizer

    adapter = tmp_path / "sft-adapter"
    shutil.copytree(start_adapter_dir, adapter)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE.replace("'\\n' + message['content']", "'\\nplease ' + message['content']")
    assert "please" in tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    tokenizer.save_pretrained(adapter)
    recipe = pairs_recipe()
    base = run_qtune_in_process("data", recipe, "--samples", "1")
    continued = run_qtune_in_process("data", recipe, "--samples", "1", f"model.adapter={adapter}")
    assert base.returncode == 0 and continued.returncode == 0, continued.stderr[-2000:]
    assert "please say the word of" not in base.stdout and "please say the word of" in continued.stdout


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
    trainer = training.build_trainer(prepared, model, dataset)
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
    trainer = training.build_trainer(prepared, model, dataset)
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


# --------------------------------------------------------------------------- (d) it learns, visibly


def last_digit_pairs(n: int, seed: int) -> list[dict]:
    """The rule: 'say the word of 3 1 4' prefers the word of the last digit (four) to any other digit's word."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [rng.randrange(10) for _ in range(3)]
        wrong = rng.choice([w for w in range(10) if w != digits[-1]])
        rows.append(
            {
                "prompt": [{"role": "user", "content": "say the word of " + " ".join(map(str, digits))}],
                "chosen": [{"role": "assistant", "content": WORDS[digits[-1]]}],
                "rejected": [{"role": "assistant", "content": WORDS[wrong]}],
            }
        )
    return rows


def _pair_logps(model, tokenizer, pair) -> tuple[float, float]:
    """log p(chosen | prompt), log p(rejected | prompt) under the chat template, computed here."""
    import torch

    def ids(messages, **kwargs) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_ids = ids(pair["prompt"], add_generation_prompt=True)
    out = []
    for key in ("chosen", "rejected"):
        full = ids(pair["prompt"] + pair[key])
        assert full[: len(prompt_ids)] == prompt_ids
        tensor = torch.tensor([full])
        with torch.no_grad():
            logps = model(input_ids=tensor).logits[0, :-1].float().log_softmax(-1)
        targets = tensor[0, 1:]
        per_token = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        out.append(per_token[len(prompt_ids) - 1 :].sum().item())
    return out[0], out[1]


@pytest.fixture(scope="module")
def wide_tiny_llama(tmp_path_factory):
    """The tiny model with wider random weights (initializer_range 0.1, as scripts/demo.py): logits with room to
    move, so a LoRA on the frozen 4-bit base can learn the rule in a few seconds."""
    from qtune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-wide", initializer_range=0.1)


@pytest.mark.slow
def test_dpo_learns_a_preference_rule_through_the_cli(tmp_path, wide_tiny_llama):
    """`qtune train` with method: dpo on synthetic pairs: on held-out pairs the implicit reward (policy vs reference
    log-ratio) prefers the chosen answer in ≥ 90% of pairs, where the starting model is at chance; the margins grow.
    Then `qtune merge` folds the DPO adapter into the base like any LoRA adapter."""
    import json

    from conftest import run_qtune_in_process, write_jsonl
    from qtune.model import load_base, load_trained

    data = write_jsonl(tmp_path / "pairs.jsonl", last_digit_pairs(200, seed=1))
    held_out = last_digit_pairs(40, seed=2)
    recipe = {
        "method": "dpo",
        "model": {"name": str(wide_tiny_llama)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "dpo": {"beta": 0.5},
        "data": {"datasets": [{"path": str(data)}], "max_length": 32, "eval_split": 0.2},
        "training": {"max_steps": 100, "micro_batch_size": 16, "grad_accum": 1, "lr": 1e-2, "logging_steps": 10,
                     "eval_steps": 50},
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = run_qtune_in_process("train", path, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "method     dpo, beta 0.5, loss sigmoid; reference: the base" in result.stdout

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in records if "rewards/margins" in r]
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9, evals
    assert evals[-1]["eval_rewards/margins"] > train_logs[0]["rewards/margins"] + 1.0, (train_logs[0], evals[-1])

    # independently of TRL, on pairs never seen in training
    loaded = load_recipe(tmp_path / "run" / "recipe.yaml")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter")
    base = load_base(loaded).eval()
    before = [_pair_logps(base, tokenizer, pair) for pair in held_out]
    base_prefers = sum(c > r for c, r in before) / len(before)
    assert 0.2 <= base_prefers <= 0.8, base_prefers  # the start knows no rule: near chance
    policy = load_trained(loaded, tmp_path / "run" / "adapter")
    after = [_pair_logps(policy, tokenizer, pair) for pair in held_out]
    margins = [(ca - cb) - (ra - rb) for (ca, ra), (cb, rb) in zip(after, before, strict=True)]
    accuracy = sum(m > 0 for m in margins) / len(margins)
    assert accuracy >= 0.9, (accuracy, base_prefers)
    print(f"held-out: base prefers chosen in {base_prefers:.0%}, DPO reward accuracy {accuracy:.0%}")

    # the adapter is a plain LoRA adapter (no "ref" copy saved): merge works as for SFT
    assert not (tmp_path / "run" / "adapter" / "ref").exists()
    merged = run_qtune_in_process("merge", tmp_path / "run")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file() or any(
        (tmp_path / "run" / "merged").glob("*.safetensors")
    )
