"""Everything downstream of training works for a GRPO run (issue #17): the reward figures in metrics.jsonl, on the
console, in reward.png and as a W&B table of samples; kill + --resume; merge; the model card naming the rewards;
chat; export-gguf. One short GRPO run is shared by the tests that only read it (`grpo_run`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import adapter_difference, kill_after_checkpoint, resume, run_qtune_in_process, write_jsonl

WORDS = "zero one two three four five six seven eight nine".split()
RUN_TRAINING = {"max_steps": 6, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "logging_steps": 1}
RUN_TRAINING |= {"save_steps": 2, "save_total_limit": 3, "eval_steps": 3}
REWARDS = [
    {"name": "accuracy", "column": "answer", "extract": "whole"},
    {"name": "length", "target": 12, "unit": "chars", "weight": 0.5},  # varies over random completions: a signal
]


def _grpo_recipe(folder: Path, model: Path) -> Path:
    import random

    rng = random.Random(1)
    rows = []
    for _ in range(40):
        digits = [rng.randrange(10) for _ in range(3)]
        prompt = [{"role": "user", "content": "say the word of " + " ".join(map(str, digits))}]
        rows.append({"prompt": prompt, "answer": WORDS[digits[-1]]})
    recipe = {
        "method": "grpo",
        "model": {"name": str(model)},
        "quantization": {"bits": 4},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "grpo": {
            "num_generations": 4,
            "max_completion_length": 6,
            "beta": 0.04,
            "samples_every": 2,
            "samples": 2,
            "rewards": REWARDS,
        },  # fmt: skip
        "data": {
            "datasets": [{"path": str(write_jsonl(folder / "prompts.jsonl", rows))}],
            "max_length": 48,
            "eval_split": 0.2,
            "chat_template": "chatml",
        },  # fmt: skip
        "training": RUN_TRAINING,
        "tracking": {"backend": "wandb", "mode": "offline", "project": "qtune-test"},
        "output_dir": str(folder / "run"),
    }
    path = folder / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """A finished 6-step GRPO run (KL beta 0.04, two rewards, eval split, checkpoints every 2 steps, W&B offline)
    through the CLI: (recipe path, run dir, its stdout). The base is a tiny Qwen2 with a byte-level BPE tokenizer
    (tests/test_gguf.py's), so export-gguf can write it too."""
    from test_gguf import bpe_tokenizer, build_model

    folder = tmp_path_factory.mktemp("grpo-run")
    recipe = _grpo_recipe(folder, build_model(folder / "tiny-qwen2-bpe", "qwen2", bpe_tokenizer()))
    result = run_qtune_in_process("train", recipe, "--quiet", env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, folder / "run", result.stdout


def _records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


# --------------------------------------------------------------------------- 1. figures, plot, W&B table


@pytest.mark.slow
def test_reward_figures_reach_metrics_console_plot_and_a_wandb_table(grpo_run):
    _, run_dir, out = grpo_run
    records = _records(run_dir)
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3, 4, 5, 6]
    for key in ("rewards/accuracy/mean", "rewards/accuracy/std", "rewards/length/mean", "reward", "kl",
                "completions/mean_length", "clip_ratio/region_mean"):  # fmt: skip
        assert all(isinstance(r.get(key), float) for r in train_logs), key
    for r in train_logs:
        total = r["rewards/accuracy/mean"] + 0.5 * r["rewards/length/mean"]
        assert r["reward"] == pytest.approx(total, abs=1e-5)  # the weighted sum, weights from the recipe
        assert r["tokens_per_s"] > 0 and r["tokens"] > 0  # prompt + generated tokens, counted by TRL
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]  # before training, at eval_steps, at the end (once)
    assert all(isinstance(r.get("eval_rewards/length/mean"), float) and "eval_reward" in r for r in evals)

    lines = [line for line in out.splitlines() if line.startswith("step ")]
    first = train_logs[0]
    assert f"reward {first['reward']:.3f} (accuracy {first['rewards/accuracy/mean']:.3f}, length " in lines[1]
    assert f"kl {first['kl']:.4f}" in lines[1] and lines[0].startswith("step 0/6 | eval loss")
    assert "held-out reward" in out and "reward.png" in out and "samples.jsonl" in out
    assert (run_dir / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (run_dir / "loss.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens_per_s"] > 0 and summary["rewards_before"]["eval_reward"] == evals[0]["eval_reward"]

    samples = _records(run_dir, "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 1, 2, 2, 4, 4, 6, 6]  # samples_every 2, samples 2
    # W&B: one table per sampled step, read back from the offline run's files, equal to samples.jsonl
    tables = [json.loads(p.read_text()) for p in (run_dir / "wandb").glob("offline-run-*/files/media/table/samples_*")]
    assert len(tables) == 4 and all(t["columns"] == ["step", "prompt", "completion", "accuracy", "length", "reward"]
                                    for t in tables)  # fmt: skip
    rows = sorted(row for t in tables for row in t["data"])
    expected = [[s["step"], s["prompt"], s["completion"], s["rewards"]["accuracy"], s["rewards"]["length"], s["reward"]]
                for s in samples]  # fmt: skip
    assert rows == sorted(expected)


# --------------------------------------------------------------------------- 2. resume


@pytest.mark.slow
def test_killed_grpo_run_resumes_to_the_uninterrupted_runs_adapter(grpo_run, tmp_path):
    """SIGKILL after checkpoint-2, then `--resume`: the same 6 steps, the same sampled completions (TRL's generation
    draws from the RNG state the checkpoint restores), one metrics line and one sample set per step, and the adapter
    of the uninterrupted shared run (same recipe and seed) to 1e-6."""
    recipe, reference, _ = grpo_run
    crash = tmp_path / "crash"
    kill_after_checkpoint(recipe, crash)
    resume(recipe, crash)
    _, max_diff = adapter_difference(reference, crash, "grpo kill-and-resume")
    assert max_diff <= 1e-6
    summary = json.loads((crash / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"].startswith("checkpoint-")
    ref_logs = [r for r in _records(reference) if "loss" in r]
    res_logs = [r for r in _records(crash) if "loss" in r]
    assert [r["step"] for r in res_logs] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "reward", "kl", "completions/mean_length"):
        assert [r[key] for r in res_logs] == pytest.approx([r[key] for r in ref_logs], abs=1e-5), key
    assert [r["step"] for r in _records(crash) if "eval_loss" in r] == [0, 3, 6]  # no second step-0 eval on resume
    assert _records(crash, "samples.jsonl") == _records(reference, "samples.jsonl")


# --------------------------------------------------------------------------- 3. model card


@pytest.mark.slow
def test_push_dry_run_card_names_the_rewards_and_the_held_out_reward(grpo_run, tmp_path):
    _, run_dir, _ = grpo_run
    staged = tmp_path / "stage"
    result = run_qtune_in_process("push", run_dir, "--repo-id", "me/tiny-grpo", "--dry-run", staged)
    assert result.returncode == 0, result.stderr[-3000:]
    card = (staged / "README.md").read_text()
    assert "grpo" in yaml.safe_load(card.split("---")[1])["tags"]
    assert "- **method**: `grpo`, Group Relative Policy Optimization (GRPO), trained with TRL's `GRPOTrainer`" in card
    assert ("- **rewards** (summed with their weights): `accuracy` (weight 1; column: answer, extract: whole); "
            "`length` (weight 0.5; target: 12, unit: chars)") in card  # fmt: skip
    assert "`num_generations`: 4" in card and "`reward_weights`: [1.0, 0.5]" in card
    assert "- **reference model**: the starting policy, frozen (KL penalty beta 0.04): the base model" in card
    assert "- **data**: prompts (the completions are generated during training" in card
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"| held-out reward before training | {summary['rewards_before']['eval_reward']:.4g} |" in card
    assert f"| held-out reward (final) | {summary['rewards']['eval_reward']:.4g} |" in card
    assert "| held-out accuracy (mean, final) |" in card and "| held-out length (mean, before training) |" in card
    assert {p.name for p in staged.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "README.md"}


# --------------------------------------------------------------------------- 4. merge, chat, export-gguf


@pytest.mark.slow
def test_merge_chat_and_export_gguf_work_on_a_grpo_run(grpo_run, tmp_path):
    """The GRPO adapter is a plain LoRA adapter: merge (verified against the adapter on its base), chat (one-shot,
    greedy: the same answer twice) and export-gguf (verified against the merged model) through the CLI."""
    _, run_dir, _ = grpo_run
    merged = run_qtune_in_process("merge", run_dir, "--out", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file() or list((tmp_path / "merged").glob("*.safetensors"))

    prompt = "say the word of 3 1 4"
    first = run_qtune_in_process("chat", run_dir, "--prompt", prompt, "--max-new-tokens", "6")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_qtune_in_process("chat", run_dir, "--prompt", prompt, "--max-new-tokens", "6")
    assert first.stdout.strip() and first.stdout == second.stdout

    out = tmp_path / "grpo.gguf"
    result = run_qtune_in_process("export-gguf", run_dir, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verified within tolerance" in result.stdout and out.read_bytes()[:4] == b"GGUF"


def test_reward_png_is_drawn_for_grpo_figures_only(tmp_path):
    """reward.png (grpo / rloo) plots the total and per-function means; SFT and preference metrics draw none (the
    preference plot is rewards.png, issue #16's name)."""
    from qtune.monitor import plot_reward_curve

    metrics, png = tmp_path / "metrics.jsonl", tmp_path / "reward.png"
    metrics.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + json.dumps({"step": 2, "rewards/margins": 0.3}))
    assert plot_reward_curve(metrics, png) is False and not png.exists()
    records = [{"step": 0, "eval_reward": 0.1, "eval_rewards/accuracy/mean": 0.1}, {"step": 1, "reward": 0.5,
               "rewards/accuracy/mean": 0.5, "loss": 0.0}, "cut sho"]  # fmt: skip
    metrics.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))
    assert plot_reward_curve(metrics, png) is True and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- 5. qtune eval


@pytest.mark.slow
def test_eval_on_a_grpo_run_answers_its_held_out_prompts(grpo_run, tmp_path):
    """`qtune eval RUN --base` on a GRPO run: its eval split holds prompts alone, so eval answers them with the base
    and with the adapter (greedy, the run's template) and reports no figure that needs a reference answer."""
    import shutil

    _, run_dir, _ = grpo_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, symlinks=True)
    result = run_qtune_in_process("eval", run, "--base", "-n", "3", "--max-new-tokens", "4", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["model"]["method"] == "grpo" and report["data"]["schema"] == "prompt_only"
    assert report["data"]["rows"] == 8 and report["settings"]["samples"] == 3  # 20% of 40 rows held out; -n 3
    # no reference answer, no completion to score: no loss, exact match or ROUGE-L, only whether answers stop
    assert set(report["tuned"]) == set(report["base"]) == set(report["meaning"]) == {"stopped"}
    rows = _records(run / "eval", "generations.jsonl")
    assert len(rows) == 3 and all(r["reference"] is None for r in rows)
    assert all(isinstance(r["tuned"], str) and isinstance(r["base"], str) for r in rows)
    assert all(r["prompt"][0]["content"].startswith("say the word of") for r in rows)
    assert all(r["prompt_text"].endswith("<|im_start|>assistant\n") for r in rows)  # the run's generation prompt
    assert (run / "eval" / "report.html").is_file() and not (run_dir / "eval").exists()
