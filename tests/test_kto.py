"""Preference tuning (issue #16) beyond DPO: method kto (unpaired labelled completions, or pairs; reference = the
starting policy, as for DPO), orpo and simpo (preference pairs, no reference; TRL keeps them in trl.experimental),
each with its section, and each learning a rule on the CPU."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from test_dpo import SINGLE, WORDS, _pair_logps, _recipe_file, last_digit_pairs

from qtune import training
from qtune.config import KTO_LOSS_TYPES, load_recipe
from qtune.errors import QtuneError

# --------------------------------------------------------------------------- (a) the methods and their sections


@pytest.mark.parametrize(
    ("method", "defaults"),
    [
        ("kto", {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, "loss_type": "kto"}),
        ("orpo", {"beta": 0.1}),
        ("simpo", {"beta": 2.0, "gamma": 1.0, "cpo_alpha": 0.0, "label_smoothing": 0.0}),
    ],
)
def test_method_section_gets_its_defaults(tmp_path, method, defaults):
    recipe = load_recipe(_recipe_file(tmp_path, method=method))
    section = getattr(recipe, method)
    assert {k: getattr(section, k) for k in defaults} == defaults
    assert all(getattr(recipe, other) is None for other in ("dpo", "kto", "orpo", "simpo", "reward") if other != method)


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"method": "kto", "kto": {"beta": 0}}, "kto.beta: Input should be greater than 0"),
        ({"method": "kto", "kto": {"desirable_wieght": 1}}, "unknown key 'kto.desirable_wieght'"),
        ({"method": "kto", "kto": {"undesirable_weight": -1}}, "kto.undesirable_weight"),
        ({"method": "kto", "kto": {"loss_type": "sigmoid"}}, "kto.loss_type"),
        ({"method": "orpo", "orpo": {"gamma": 1}}, "unknown key 'orpo.gamma'"),
        ({"method": "simpo", "simpo": {"gamma": -1}}, "simpo.gamma: Input should be greater than or equal to 0"),
        ({"method": "dpo", "kto": {"beta": 0.2}}, "kto: settings for method kto, but method is dpo"),
        ({"simpo": {"beta": 2}}, "simpo: settings for method simpo, but method is sft"),
        ({"method": "orpo", "data": {"datasets": [{"path": "p.jsonl"}], "packing": True}}, "data: packing"),
        ({"method": "kto", "data": {"datasets": [{"path": "p.jsonl"}], "train_on": "all"}}, "data: train_on"),
        (
            {"method": "kto", "training": {"micro_batch_size": 1}},
            "training.micro_batch_size: 1 with method kto",
        ),
    ],
)
def test_method_sections_are_strictly_validated(tmp_path, top, message):
    with pytest.raises(QtuneError, match=re.escape(message)):
        load_recipe(_recipe_file(tmp_path, **top))


def test_kto_apo_zero_unpaired_takes_a_micro_batch_of_one(tmp_path):
    recipe = load_recipe(
        _recipe_file(tmp_path, method="kto", kto={"loss_type": "apo_zero_unpaired"}, training={"micro_batch_size": 1})
    )
    assert recipe.kto.loss_type == "apo_zero_unpaired"


def test_kto_loss_types_are_trls():
    from trl import KTOConfig

    assert set(KTOConfig.__dataclass_fields__["loss_type"].metadata["choices"]) == set(KTO_LOSS_TYPES)


def test_method_table_builds_each_methods_trl_config(tmp_path):
    """kto → trl.KTOConfig; orpo → trl.experimental.orpo.ORPOConfig; simpo → trl.experimental.cpo.CPOConfig with
    loss_type simpo; each section reaches its config."""
    from trl import KTOConfig

    recipe = load_recipe(
        _recipe_file(tmp_path, method="kto"),
        [f"output_dir={tmp_path / 'k'}", "kto.beta=0.3", "kto.desirable_weight=1.33", "kto.undesirable_weight=0.5"],
    )
    args = training.trainer_config(recipe, SINGLE)
    assert type(args) is KTOConfig
    assert (args.beta, args.desirable_weight, args.undesirable_weight, args.loss_type) == (0.3, 1.33, 0.5, "kto")
    assert args.train_sampling_strategy == "sequential"  # TRL's KL estimate needs it; qtune leaves it alone

    orpo = training.trainer_config(load_recipe(_recipe_file(tmp_path, method="orpo"), ["orpo.beta=0.25"]), SINGLE)
    assert type(orpo).__name__ == "ORPOConfig" and type(orpo).__module__.startswith("trl.experimental.orpo")
    assert orpo.beta == 0.25
    simpo = training.trainer_config(
        load_recipe(_recipe_file(tmp_path, method="simpo"), ["simpo.gamma=0.8", "simpo.cpo_alpha=0.1"]), SINGLE
    )
    assert type(simpo).__name__ == "CPOConfig" and type(simpo).__module__.startswith("trl.experimental.cpo")
    assert (simpo.loss_type, simpo.beta, simpo.simpo_gamma, simpo.cpo_alpha) == ("simpo", 2.0, 0.8, 0.1)
    assert set(training.METHODS) == {"sft", "dpo", "kto", "orpo", "simpo", "reward", "grpo", "rloo"}
    assert [m for m, row in training.METHODS.items() if row.reference] == ["dpo", "kto"]
    assert [m for m, row in training.METHODS.items() if training.experimental(row)] == ["orpo", "simpo"]


def test_training_extra_is_checked_against_the_methods_config(tmp_path):
    kto = load_recipe(_recipe_file(tmp_path, method="kto"), [f"output_dir={tmp_path / 'k'}"])
    with pytest.raises(QtuneError, match="already set by the recipe key kto.desirable_weight"):
        extra = kto.training.model_copy(update={"extra": {"desirable_weight": 2.0}})
        training.trainer_config(kto.model_copy(update={"training": extra}), SINGLE)
    simpo = load_recipe(_recipe_file(tmp_path, method="simpo"))
    with pytest.raises(QtuneError, match="already set by the recipe key simpo.gamma"):
        training.trainer_config(
            simpo.model_copy(update={"training": simpo.training.model_copy(update={"extra": {"simpo_gamma": 1}})}),
            SINGLE,
        )


# --------------------------------------------------------------------------- (b) unpaired data


def unpaired_rows(n: int, seed: int = 0, form: str = "messages") -> list[dict]:
    """The last-digit rule as KTO data: each prompt gets one completion, the right word (label true) or another
    digit's word (label false), half and half."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        digits = [rng.randrange(10) for _ in range(3)]
        good = i % 2 == 0
        word = WORDS[digits[-1]] if good else WORDS[rng.choice([w for w in range(10) if w != digits[-1]])]
        prompt = "say the word of " + " ".join(map(str, digits))
        if form == "messages":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": word}],
                    "label": good,
                }
            )
        else:
            rows.append({"prompt": prompt + ":", "completion": " " + word, "label": good})
    return rows


@pytest.fixture
def kto_recipe(tmp_path, tiny_llama):
    from conftest import write_jsonl

    def make(rows=None, **sections) -> str:
        data = write_jsonl(tmp_path / "kto.jsonl", rows if rows is not None else unpaired_rows(24))
        recipe = {
            "method": "kto",
            "model": {"name": str(tiny_llama)},
            "quantization": {"bits": 4},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"datasets": [{"path": str(data)}], "max_length": 64},
            "training": {"max_steps": 2, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "logging_steps": 1},
            "output_dir": str(tmp_path / "run"),
        }
        for key, value in sections.items():
            recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
        path = tmp_path / "kto.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return str(path)

    return make


@pytest.mark.parametrize("form", ["messages", "text"])
def test_qtune_data_shows_unpaired_rows_as_trl_prepares_them(kto_recipe, form):
    from conftest import run_qtune_in_process

    result = run_qtune_in_process("data", kto_recipe(unpaired_rows(12, form=form)), "--samples", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "format unpaired (detected), 12 rows" in out
    assert "labelled completions: 12 train (6 desirable, 6 undesirable)" in out
    assert "--- example 1," in out and "--- example 2," in out
    first = out.split("--- example 1, ")[1].split("--- example 2")[0]
    prompt_part, scored = first.split("]", 1)[1].split("]", 1) if first.startswith("desirable") else (None, None)
    if form == "messages" and prompt_part is not None:
        assert "say the word of" in prompt_part and "<|im_end|>" in scored


def test_unpaired_format_can_be_set_and_mapped(kto_recipe, tmp_path):
    from conftest import run_qtune_in_process, write_jsonl

    rows = [{"q": r["prompt"], "a": r["completion"], "good": r["label"]} for r in unpaired_rows(8)]
    data = write_jsonl(tmp_path / "mapped.jsonl", rows)
    source = [{"path": str(data), "format": "unpaired", "columns": {"prompt": "q", "completion": "a", "label": "good"}}]
    result = run_qtune_in_process("data", kto_recipe(), f"data.datasets={json.dumps(source)}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "format unpaired (set), 8 rows" in result.stdout and "(4 desirable, 4 undesirable)" in result.stdout


def test_a_label_column_that_is_not_boolean_stays_prompt_completion_for_sft(kto_recipe):
    from conftest import run_qtune_in_process

    rows = [{**r, "label": "greeting"} for r in unpaired_rows(8, form="text")]
    result = run_qtune_in_process("data", kto_recipe(rows), "method=sft", "kto=null")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "format prompt_completion (detected), 8 rows" in result.stdout


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_bad_label_names_file_and_row(kto_recipe, bad):
    from conftest import run_qtune_in_process

    rows = unpaired_rows(8)
    rows[4]["label"] = bad
    result = run_qtune_in_process("data", kto_recipe(rows))
    assert result.returncode == 2
    assert f"kto.jsonl: row 5: 'label' must be true (desirable) or false (undesirable), got {bad!r}" in result.stderr


@pytest.mark.parametrize("label", [True, False])
def test_one_label_only_is_refused_naming_the_file(kto_recipe, label):
    from conftest import run_qtune_in_process

    rows = [{**r, "label": label} for r in unpaired_rows(8)]
    kind = "true (desirable)" if label else "false (undesirable)"
    for command in ("data", "train"):
        result = run_qtune_in_process(command, kto_recipe(rows))
        assert result.returncode == 2
        assert re.search(rf"every one of the 8 rows of \S*kto\.jsonl has label {re.escape(kind)}", result.stderr)


def test_kto_takes_preference_pairs_unpaired_and_shuffled(kto_recipe):
    """Pairs for kto: each becomes a desirable (chosen) and an undesirable (rejected) completion, shuffled so that
    KTO's in-order batches mix both labels (TRL would unpair them in one block of each)."""
    from test_dpo import digit_pairs

    from qtune import pipeline

    recipe = load_recipe(kto_recipe(digit_pairs(16)))
    prepared = pipeline.prepare(recipe, SINGLE, training=False)
    assert prepared.fmt == "unpaired" and len(prepared.rows) == 32
    assert sum(r["label"] for r in prepared.rows) == 16
    labels = [r["label"] for r in prepared.rows]
    assert labels != sorted(labels, reverse=True)  # not chosen-block then rejected-block
    assert all(re.search(r"kto\.jsonl: row \d+ \((chosen|rejected)\)$", w) for w in prepared.rows.where)
    assert prepared.examples.stats["pairs"] == 32 and prepared.examples.stats["desirable"] == 16


def test_method_and_data_must_match(kto_recipe, chat_data):
    from conftest import run_qtune_in_process

    result = run_qtune_in_process("data", kto_recipe(), "method=dpo")
    assert result.returncode == 2
    assert "unpaired rows (prompt / completion / label) but method is dpo" in result.stderr
    assert "set method: kto" in result.stderr
    result = run_qtune_in_process("data", kto_recipe(), "method=sft")
    assert result.returncode == 2 and "unpaired rows (prompt / completion / label) but method is sft" in result.stderr
    result = run_qtune_in_process("data", kto_recipe(), f"data.datasets.0.path={chat_data}")
    assert result.returncode == 2 and "method kto trains on unpaired or preference rows" in result.stderr


def test_kto_reference_is_the_starting_policy(kto_recipe):
    """As for DPO: the reference is a frozen "ref" copy of the starting adapter on the same 4-bit base, and the
    trainable adapter starts equal to it (the fresh adapter here: the reference is the base)."""
    import torch

    from qtune import pipeline
    from qtune.data.cache import build_dataset
    from qtune.model import load_for_training

    recipe = load_recipe(kto_recipe())
    prepared = pipeline.prepare(recipe, SINGLE)
    model = load_for_training(recipe, SINGLE, prepared.tokenizer, verbose=False)
    dataset = build_dataset(recipe, prepared.tokenizer, prepared.fmt, prepared.rows, prepared.args)
    trainer = training.build_trainer(prepared, model, dataset)
    assert type(trainer).__name__ == "KTOTrainer"
    assert set(trainer.model.peft_config) == {"default", "ref"}
    params = dict(trainer.model.named_parameters())
    assert not any(p.requires_grad for n, p in params.items() if ".ref." in n)
    for name, param in params.items():
        if ".default." in name and param.requires_grad:
            assert torch.equal(param.detach(), params[name.replace(".default.", ".ref.")].detach().float()), name


# --------------------------------------------------------------------------- (c) they learn, visibly


@pytest.fixture(scope="module")
def wide_tiny_llama(tmp_path_factory):
    """test_dpo's wide tiny model (initializer_range 0.1): logits with room to move in a few seconds."""
    from qtune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-wide", initializer_range=0.1)


def _learn(tmp_path, model_dir, method: str, rows: list[dict], section: dict, steps: int, lr: float):
    from conftest import run_qtune_in_process, write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", rows)
    recipe = {
        "method": method,
        "model": {"name": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        method: section,
        "data": {"datasets": [{"path": str(data)}], "max_length": 32},
        "training": {"max_steps": steps, "micro_batch_size": 16, "grad_accum": 1, "lr": lr, "logging_steps": 10},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = run_qtune_in_process("train", path, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _held_out(tmp_path, held_out):
    """(base, policy) log p(chosen), log p(rejected) on held-out pairs, computed here (not TRL's code)."""
    from transformers import AutoTokenizer

    from qtune.model import load_base, load_trained

    loaded = load_recipe(tmp_path / "run" / "recipe.yaml")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter")
    base = load_base(loaded).eval()
    before = [_pair_logps(base, tokenizer, pair) for pair in held_out]
    policy = load_trained(loaded, tmp_path / "run" / "adapter")
    after = [_pair_logps(policy, tokenizer, pair) for pair in held_out]
    return before, after


@pytest.mark.slow
def test_kto_learns_a_preference_rule_through_the_cli(tmp_path, wide_tiny_llama):
    """`qtune train` with method: kto on unpaired labelled completions of the last-digit rule: on held-out pairs never
    seen in training, the implicit reward (policy vs reference log-ratio) prefers the right word in ≥ 75% of pairs
    (82% measured in 100 steps, ~25 s), where the starting model prefers it in 35%. KTO sees each prompt with one
    labelled completion only, so it learns the rule more slowly than DPO does from pairs."""
    result = _learn(tmp_path, wide_tiny_llama, "kto", unpaired_rows(400, seed=1), {"beta": 0.5}, steps=100, lr=1e-2)
    assert "method     kto, beta 0.5, loss kto, weights desirable 1 / undesirable 1; reference: the base" in (
        result.stdout
    )
    before, after = _held_out(tmp_path, last_digit_pairs(40, seed=2))
    base_prefers = sum(c > r for c, r in before) / len(before)
    assert 0.2 <= base_prefers <= 0.8, base_prefers
    margins = [(ca - cb) - (ra - rb) for (ca, ra), (cb, rb) in zip(after, before, strict=True)]
    accuracy = sum(m > 0 for m in margins) / len(margins)
    policy_prefers = sum(c > r for c, r in after) / len(after)
    print(
        f"held-out: base prefers chosen {base_prefers:.0%}; KTO reward accuracy {accuracy:.0%}, policy {policy_prefers:.0%}"
    )
    assert accuracy >= 0.75 and accuracy - base_prefers >= 0.3, (accuracy, base_prefers)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "section"), [("orpo", {"beta": 0.5}), ("simpo", {"beta": 2.0, "gamma": 1.0})])
def test_reference_free_methods_learn_a_preference_rule(tmp_path, wide_tiny_llama, method, section):
    """`qtune train` with method orpo / simpo (TRL's experimental trainers, said once at start) on last-digit pairs:
    on held-out pairs the trained model itself prefers the right word in ≥ 85% of pairs (these methods have no
    reference: their reward is the policy's own log-probability; measured: orpo 100%, simpo 92% in 100 steps, ~22 s
    each), where the starting model prefers it in 35%."""
    result = _learn(tmp_path, wide_tiny_llama, method, last_digit_pairs(200, seed=1), section, steps=100, lr=1e-2)
    assert result.stdout.count("TRL keeps this trainer in its experimental module") == 1
    assert "trl.experimental" not in result.stderr  # TRL's own import warning is not repeated
    before, after = _held_out(tmp_path, last_digit_pairs(40, seed=2))
    base_prefers = sum(c > r for c, r in before) / len(before)
    policy_prefers = sum(c > r for c, r in after) / len(after)
    print(f"held-out: base prefers chosen {base_prefers:.0%}; {method} policy prefers chosen {policy_prefers:.0%}")
    assert 0.2 <= base_prefers <= 0.8, base_prefers
    assert policy_prefers >= 0.85, (policy_prefers, base_prefers)
