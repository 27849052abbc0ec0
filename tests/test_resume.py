"""Runs that survive: SIGKILL + --resume ends where an uninterrupted run ends, SIGTERM saves a checkpoint,
a checkpoint from another recipe is refused, a NaN loss stops the run at its last good checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import adapter_difference, kill_after_checkpoint, resume, run_qtune_in_process, start_qtune, wait_for

pytestmark = pytest.mark.slow


def _start(*args) -> subprocess.Popen:
    return start_qtune("train", *args, "--quiet")


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def test_killed_run_resumes_to_the_same_adapter_and_step_count(make_recipe, tmp_path):
    recipe = make_recipe(training={"max_steps": 8, "save_steps": 2, "save_total_limit": 2, "logging_steps": 2})
    reference = _start(recipe, f"output_dir={tmp_path / 'ref'}")  # uninterrupted, same seed, in parallel
    kill_after_checkpoint(recipe, tmp_path / "crash")
    resume(recipe, tmp_path / "crash")
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    _, max_diff = adapter_difference(tmp_path / "ref", tmp_path / "crash", "kill-and-resume")
    assert max_diff <= 1e-6

    for name in ("ref", "crash"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["steps"] == 8
        # one metrics line per log step, also across the crash (lines after the checkpoint are redone once)
        assert _steps(tmp_path / name) == [2, 4, 6, 8]
        kept = sorted(p.name for p in (tmp_path / name / "checkpoints").glob("checkpoint-*"))
        assert kept == ["checkpoint-6", "checkpoint-8"]  # save_total_limit: 2
    ref_losses = [json.loads(x)["loss"] for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    res_losses = [json.loads(x)["loss"] for x in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert ref_losses == pytest.approx(res_losses, abs=1e-6)


def test_sigterm_saves_a_checkpoint_other_recipes_are_refused_resume_auto_finishes(make_recipe, tmp_path, tiny_qwen):
    recipe = make_recipe(training={"max_steps": 200, "logging_steps": 1})  # no periodic checkpoints at all
    run_dir = tmp_path / "run"
    proc = _start(recipe)
    wait_for(run_dir / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    assert "error: training stopped by SIGTERM at step" in err and "--resume" in err
    [checkpoint] = (run_dir / "checkpoints").glob("checkpoint-*")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == int(checkpoint.name.split("-")[1]) < 200
    assert not (run_dir / "adapter").exists()

    snapshot = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for override, changed in (("lora.r=4", "lora.r 8 -> 4"), (f"model.name={tiny_qwen}", "model.name")):
        refused = run_qtune_in_process("train", recipe, "--resume", override)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "training.resume:" in refused.stderr and "different recipe" in refused.stderr
        assert changed in refused.stderr and "hint:" in refused.stderr and "Traceback" not in refused.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == snapshot  # nothing touched

    step = state["global_step"]
    finished = run_qtune_in_process(
        "train", recipe, "training.resume=auto", f"training.max_steps={step + 2}", "--quiet"
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == step + 2
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == checkpoint.name


def test_nan_loss_stops_at_the_last_good_checkpoint(make_recipe, tmp_path):
    recipe = make_recipe(training={"max_steps": 8, "logging_steps": 1, "save_steps": 1, "lr": 1e30})
    result = run_qtune_in_process("train", recipe, "training.max_grad_norm=1e30", "--quiet")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "is not a finite number" in result.stderr and "the adapter was not saved" in result.stderr
    run_dir = tmp_path / "run"
    bad_step = int(result.stderr.split("training stopped at step ")[1].split("/")[0])
    last_good = run_dir / "checkpoints" / f"checkpoint-{bad_step - 1}"
    assert f"last good checkpoint: {last_good}" in result.stderr
    kept = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert kept and max(kept) == bad_step - 1  # nothing saved from the NaN step on
    weights = load_file(last_good / "adapter_model.safetensors")
    assert all(bool(v.isfinite().all()) for v in weights.values())
    assert not (run_dir / "adapter").exists()
