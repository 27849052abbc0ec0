"""Everything downstream of training works for the preference methods (issue #16): per-step reward figures in
metrics.jsonl, on the console and in rewards.png; kill + --resume; the model card; chat, export-gguf; bad input;
the estimate. One short DPO run is shared by the tests that only read it (`dpo_run`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_dpo import last_digit_pairs

from conftest import adapter_difference, kill_after_checkpoint, resume, run_qtune_in_process, write_jsonl

RUN_TRAINING = {"max_steps": 6, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "logging_steps": 1}
RUN_TRAINING |= {"save_steps": 2, "save_total_limit": 3, "eval_steps": 3}


def _dpo_recipe(folder: Path, model: Path) -> Path:
    data = write_jsonl(folder / "pairs.jsonl", last_digit_pairs(40, seed=1))
    recipe = {
        "method": "dpo",
        "model": {"name": str(model)},
        "quantization": {"bits": 4},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "dpo": {"beta": 0.2},
        "data": {"datasets": [{"path": str(data)}], "max_length": 48, "eval_split": 0.2, "chat_template": "chatml"},
        "training": RUN_TRAINING,
        "output_dir": str(folder / "run"),
    }
    path = folder / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """A finished 6-step DPO run through the CLI (`qtune train --quiet`): (recipe path, run dir, its stdout). The
    base is a tiny Qwen2 with a byte-level BPE tokenizer (tests/test_gguf.py's), so export-gguf can write it too."""
    from test_gguf import bpe_tokenizer, build_model

    folder = tmp_path_factory.mktemp("dpo-run")
    recipe = _dpo_recipe(folder, build_model(folder / "tiny-qwen2-bpe", "qwen2", bpe_tokenizer()))
    result = run_qtune_in_process("train", recipe, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, folder / "run", result.stdout


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- 1. metrics


@pytest.mark.slow
def test_reward_figures_reach_metrics_console_and_a_plot(dpo_run):
    _, run_dir, out = dpo_run
    records = _records(run_dir)
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3, 4, 5, 6]  # every step
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        assert all(isinstance(r.get(key), float) for r in train_logs), key
    for r in train_logs:
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        assert 0.0 <= r["rewards/accuracies"] <= 1.0
    evals = [r for r in records if "eval_loss" in r]
    assert {r["step"] for r in evals} == {3, 6} and all("eval_rewards/margins" in r for r in evals)

    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) >= 6, out
    first = train_logs[0]
    assert (
        f"margin {first['rewards/margins']:+.3f}" in lines[0] and f"acc {first['rewards/accuracies']:.0%}" in lines[0]
    )
    assert "rewards: chosen" in lines[0] and "logp chosen" in lines[0]
    assert any("eval margin" in line for line in lines)

    png = run_dir / "rewards.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (run_dir / "loss.png").is_file()
    assert "rewards.png" in out  # the run dir listing names it


def test_sft_runs_draw_no_reward_plot(tmp_path):
    from qtune.monitor import plot_rewards

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert plot_rewards(metrics, tmp_path / "rewards.png") is False and not (tmp_path / "rewards.png").exists()


# --------------------------------------------------------------------------- 2. resume


@pytest.mark.slow
def test_killed_dpo_run_resumes_to_the_uninterrupted_runs_adapter(dpo_run, tmp_path):
    """SIGKILL after checkpoint-2, then `--resume`: the same 6 steps, one metrics line per step, and the adapter
    of the uninterrupted shared run (same recipe and seed) to 1e-6."""
    recipe, reference, _ = dpo_run
    crash = tmp_path / "crash"
    kill_after_checkpoint(recipe, crash)
    resume(recipe, crash)
    res, max_diff = adapter_difference(reference, crash, "dpo kill-and-resume")
    assert not any(".ref." in k for k in res)  # the frozen reference copy is not part of the result
    assert max_diff <= 1e-6
    summary = json.loads((crash / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"].startswith("checkpoint-")
    ref_logs = [r for r in _records(reference) if "loss" in r]
    res_logs = [r for r in _records(crash) if "loss" in r]
    assert [r["step"] for r in res_logs] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert [r[key] for r in res_logs] == pytest.approx([r[key] for r in ref_logs], abs=1e-5), key


# --------------------------------------------------------------------------- 3. model card


@pytest.mark.slow
def test_push_dry_run_card_names_the_method_its_settings_and_data(dpo_run, tmp_path):
    _, run_dir, _ = dpo_run
    staged = tmp_path / "stage"
    result = run_qtune_in_process("push", run_dir, "--repo-id", "me/tiny-dpo", "--dry-run", staged)
    assert result.returncode == 0, result.stderr[-3000:]
    card = (staged / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert "dpo" in meta["tags"] and "sft" not in meta["tags"]
    assert "by Direct Preference Optimization (DPO)" in card and "## Training method" in card
    assert "- **method**: `dpo`, Direct Preference Optimization (DPO), trained with TRL's `DPOTrainer`" in card
    assert "`beta`: 0.2" in card and "`loss_type`: ['sigmoid']" in card
    assert "- **reference model**: the base model (the starting policy), frozen" in card
    assert "- **data**: preference pairs (prompt / chosen / rejected), max_length 48 tokens, from:" in card
    assert f"`{run_dir.parent / 'pairs.jsonl'}` (a local file" in card
    summary = json.loads((run_dir / "summary.json").read_text())
    accuracy = summary["rewards"]["eval_rewards/accuracies"]
    assert f"| eval reward accuracy | {accuracy:.4g} |" in card and "| reward margin (last train step) |" in card


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("sft", ["`sft`, supervised fine-tuning (SFT), trained with TRL's `SFTTrainer`", "`packing`: False",
                 "- **data**: chats, prompt / completion pairs or plain text"]),
        ("kto", ["Kahneman-Tversky Optimization (KTO)", "`KTOTrainer`", "`desirable_weight`: 1.0",
                 "- **reference model**: the base model", "- **data**: unpaired rows (prompt / completion / label)"]),
        ("orpo", ["Odds Ratio Preference Optimization (ORPO)", "`ORPOTrainer`", "`beta`: 0.1",
                  "- **reference model**: none"]),
        ("simpo", ["Simple Preference Optimization (SimPO)", "`CPOTrainer`", "`loss_type`: simpo", "`simpo_gamma`"]),
    ],
)  # fmt: skip
def test_card_text_for_every_method(tmp_path, method, expected):
    from qtune.config import load_recipe
    from qtune.publish import model_card

    path = tmp_path / "r.yaml"
    recipe = {"method": method, "model": {"name": "meta-llama/Llama-3.1-8B"}}
    recipe["data"] = {"datasets": [{"path": "trl-lib/ultrafeedback_binarized", "split": "train_prefs"}]}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    card = model_card(load_recipe(path), "me/x", merged=False, summary=None)
    for text in expected:
        assert text in card, (text, card)
    assert yaml.safe_load(card.split("---")[1])["tags"][3] == method
    link = "[trl-lib/ultrafeedback_binarized](https://huggingface.co/datasets/trl-lib/ultrafeedback_binarized)"
    assert f"  - {link} (format auto; split train_prefs)" in card


# --------------------------------------------------------------------------- 4. chat, export-gguf


@pytest.mark.slow
def test_chat_and_export_gguf_work_on_a_dpo_run(dpo_run, tmp_path):
    """The DPO adapter is a plain LoRA adapter: chat (one-shot, greedy: the same answer twice) and export-gguf
    (merged, written, verified against the merged model) through the CLI."""
    _, run_dir, _ = dpo_run
    prompt = "say the word of 3 1 4"
    first = run_qtune_in_process("chat", run_dir, "--prompt", prompt, "--max-new-tokens", "6")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_qtune_in_process("chat", run_dir, "--prompt", prompt, "--max-new-tokens", "6")
    assert first.stdout.strip() and first.stdout == second.stdout

    out = tmp_path / "dpo.gguf"
    result = run_qtune_in_process("export-gguf", run_dir, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verified within tolerance" in result.stdout and out.read_bytes()[:4] == b"GGUF"


# --------------------------------------------------------------------------- 5. bad input


def _pairs(n: int = 8) -> list[dict]:
    return json.loads(json.dumps(last_digit_pairs(n, seed=3)))  # no shared message objects between rows


def _implicit(n: int = 8) -> list[dict]:
    return [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in _pairs(n)]


def _bad(rows: list[dict], row: int, **change) -> list[dict]:
    for key, value in change.items():
        if value is KeyError:
            del rows[row][key]
        else:
            rows[row][key] = value
    return rows


BAD_ROWS = [  # (rows, the error after "file: row 4: ", the reason counted when skipped)
    (_bad(_pairs(), 3, rejected=KeyError), "missing 'rejected'", "missing 'rejected'"),
    (_bad(_pairs(), 3, chosen=None), "missing 'chosen'", "missing 'chosen'"),
    (_bad(_pairs(), 3, chosen=[]), "'chosen' must be a non-empty list", "'chosen' must be a non-empty list"),
    (
        _bad(_pairs(), 3, rejected=[{"role": "assistant", "content": ""}]),
        "rejected[0] is an empty assistant answer",
        "rejected is an empty assistant answer",
    ),
    (
        _bad([{"prompt": "say :", "chosen": " one", "rejected": " two"} for _ in range(8)], 3, chosen=""),
        "missing, null or empty 'chosen'",
        "missing, null or empty 'chosen'",
    ),
    (
        _bad(_implicit(), 3, chosen=[{"role": "user", "content": "another question"}, {"role": "assistant", "content": "x"}]),
        "'chosen' and 'rejected' share no prompt (their first messages differ)",
        "'chosen' and 'rejected' share no prompt",
    ),
    (
        _bad([{"chosen": "say 1 : one", "rejected": "say 1 : two"} for _ in range(8)], 3, chosen="tell 1 : one"),
        "no 'prompt', and 'chosen' and 'rejected' share no prefix to take as the prompt",
        "no 'prompt', and 'chosen' and 'rejected' share no prefix",
    ),
]  # fmt: skip


def _pref_recipe(tmp_path, model, rows, **sections) -> Path:
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = {
        "method": "dpo",
        "model": {"name": str(model)},
        "data": {"datasets": [{"path": str(data)}], "max_length": 64},
        "training": {"max_steps": 1, "micro_batch_size": 4},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def _one_error_nothing_written(result, run_dir: Path) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not run_dir.exists()
    return errors[0]


@pytest.mark.parametrize(("rows", "error", "reason"), BAD_ROWS)
def test_bad_preference_rows_name_file_and_row_or_are_skipped_and_counted(tmp_path, tiny_llama, rows, error, reason):
    recipe = _pref_recipe(tmp_path, tiny_llama, rows)
    line = _one_error_nothing_written(run_qtune_in_process("train", recipe), tmp_path / "run")
    assert f"pairs.jsonl: row 4: {error}" in line, line

    skipped = run_qtune_in_process("data", recipe, "data.on_bad_row=skip")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert f"pairs.jsonl: skipped 1 bad row(s) (1 {reason}" in skipped.stderr, skipped.stderr[-2000:]
    assert "first: row 4: " + error in skipped.stderr and "7 rows" in skipped.stdout


@pytest.fixture(scope="module")
def wider_adapter(tmp_path_factory, tiny_llama) -> Path:
    """An adapter trained on another base (hidden size 128, not 64) whose config names tiny_llama as its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qtune.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("wider")
    other = build_tiny_model(root / "wider-llama", hidden_size=128, intermediate_size=256)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model.save_pretrained(root / "adapter", safe_serialization=True)
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_llama)
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    return root / "adapter"


def test_an_adapter_from_another_base_says_whether_name_or_shapes_differ(tmp_path, tiny_llama, wider_adapter):
    recipe = _pref_recipe(tmp_path, tiny_llama, _pairs())
    line = _one_error_nothing_written(
        run_qtune_in_process("train", recipe, f"model.adapter={wider_adapter}"), tmp_path / "run"
    )
    assert "LoRA shapes differ; the base name matches" in line, line
    assert (
        "model.layers.0." in line and "lora_A.weight has shape [4, 256], for 256 inputs" in line and "has 128" in line
    )

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for item in wider_adapter.iterdir():
        (renamed / item.name).write_bytes(item.read_bytes())
    config = json.loads((renamed / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/another-base"
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    line = _one_error_nothing_written(
        run_qtune_in_process("train", recipe, f"model.adapter={renamed}"), tmp_path / "run"
    )
    assert "was trained on org/another-base" in line and f"not on model.name {tiny_llama}" in line


COMBINATIONS = [  # (method, overrides, the error's words) TRL cannot run, refused before any weight loads
    ("dpo", ["training.extra.sync_ref_model=true"], "sync_ref_model: true with method dpo"),
    ("kto", ["training.extra.sync_ref_model=true"], "sync_ref_model: true with method kto"),
    (
        "dpo",
        ["training.extra.liger_kernel_config={fused_linear_cross_entropy: true}"],
        "TRL's DPOTrainer patches the LM head itself",
    ),
    ("kto", ["training.extra.train_sampling_strategy=random"], "KTOTrainer needs sequential sampling"),
]


@pytest.mark.parametrize(("method", "overrides", "words"), COMBINATIONS)
def test_method_combinations_trl_cannot_run_are_refused(tmp_path, tiny_llama, method, overrides, words):
    recipe = _pref_recipe(tmp_path, tiny_llama, _pairs(), method=method)
    line = _one_error_nothing_written(run_qtune_in_process("train", recipe, *overrides), tmp_path / "run")
    assert words in line and "accelerate config: distributed_type NO" in line, line
