"""Watching a run: metrics.jsonl / summary.json / loss.png / console, W&B offline and TensorBoard read back
from the files they wrote, secrets kept out, W&B online without a login refused up front."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qtune.config import load_recipe, recipe_to_dict
from qtune.errors import QtuneError

SECRET = "hf_qtuneTestSecretValue0123456789"
STEP_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_per_device", "samples_per_s"}
STEP_KEYS |= {"peak_rss_gb", "elapsed_s", "remaining_s"}


def _wandb_records(run_file: Path) -> list:
    """The records of an offline run's .wandb file (W&B's LevelDB-style log: 7-byte file header, then
    32 KiB blocks of chunks with a crc32/length/type header), parsed with W&B's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending, records = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of a block
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: one record complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _run(*args, env: dict, cwd: Path):
    return subprocess.run(
        [sys.executable, "-m", "qtune", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


@pytest.mark.slow
def test_metrics_summary_plot_console_and_wandb_offline_read_back(make_recipe, tmp_path):
    recipe = make_recipe(
        data={"eval_split": 0.25},
        training={"max_steps": 4, "logging_steps": 2, "eval_steps": 2},
        tracking={"backend": "wandb", "mode": "offline", "project": "qtune-test", "tags": ["ci"], "log_model": True},
    )
    env = {**os.environ, "WANDB_MODE": "offline", "HF_TOKEN": SECRET, "WANDB_API_KEY": SECRET.replace("hf_", "x" * 9)}
    result = _run("train", recipe, "--quiet", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"

    # metrics.jsonl: one line per log step with the figures, and the eval losses
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4] and {r["step"] for r in evals} == {2, 4}
    for r in train:
        assert r.keys() >= STEP_KEYS, STEP_KEYS - r.keys()
        assert r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 and r["peak_rss_gb"] > 0.05
    assert train[1]["tokens"] > train[0]["tokens"] > 0 and train[1]["remaining_s"] == 0

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == train[1]["tokens"]
    assert summary["final_loss"] == train[1]["loss"] and summary["eval_loss"] > 0
    assert summary["tokens_per_s"] > 0 and summary["wall_time_s"] > 0 and summary["peak_rss_gb"] > 0.05
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # console: the start summary, one line per log step without progress bars (--quiet), where things are, next
    out = result.stdout
    assert "qtune: run summary" in out and "trainable" in out and "4-bit NF4 + double quant" in out
    assert "4 per device x 1 accumulation x 1 process(es) = 4 examples" in out and "48 train rows, 16 eval rows" in out
    assert "step 2/4 | loss" in out and "tok/s" in out and "it/s]" not in out + result.stderr
    assert f"qtune chat {run_dir}" in out and f"qtune merge {run_dir}" in out and "wandb sync" in out

    # W&B offline: the resolved recipe as config, the figures as history, the adapter as an artifact
    [run_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    kinds: dict[str, list] = {}
    for record in _wandb_records(run_file):
        kinds.setdefault(record.WhichOneof("record_type"), []).append(record)
    run = kinds["run"][0].run
    assert run.project == "qtune-test" and list(run.tags) == ["ci"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    expected = recipe_to_dict(load_recipe(recipe))
    assert all(config[section] == expected[section] for section in expected)
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in kinds["history"]
    ]
    logged = {(h.get("train/global_step"), key) for h in history for key in h}
    assert {(2, "train/loss"), (4, "train/loss"), (4, "train/tokens_per_s"), (4, "train/peak_rss_gb")} <= logged
    assert {(2, "eval/loss"), (4, "eval/loss")} <= logged
    artifacts = [r.artifact for r in kinds.get("artifact", [])]
    assert any(a.type == "model" and a.name.endswith("-adapter") for a in artifacts)
    names = {entry.path for a in artifacts for entry in a.manifest.contents}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names

    # secrets from the environment reach no file qtune or W&B wrote, nor the console
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix != ".png":
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in out + result.stderr
    assert "<redacted>" not in json.dumps(expected)  # nothing in this recipe looks secret: all of it arrived


@pytest.mark.slow
def test_resumed_run_logs_into_the_same_wandb_run_and_a_new_run_gets_a_new_one(make_recipe, tmp_path):
    recipe = make_recipe(
        training={"max_steps": 4, "logging_steps": 2, "save_steps": 2},
        tracking={"backend": "wandb", "mode": "offline", "project": "qtune-test"},
    )
    env = {**os.environ, "WANDB_MODE": "offline"}
    run_dir = tmp_path / "run"

    def run_ids() -> list[str]:
        files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda f: f.stat().st_mtime)
        return [next(r.run.run_id for r in _wandb_records(f) if r.WhichOneof("record_type") == "run") for f in files]

    assert _run("train", recipe, "--quiet", env=env, cwd=tmp_path).returncode == 0
    first = (run_dir / "wandb_run_id").read_text().strip()
    assert run_ids() == [first]
    result = _run("train", recipe, "--quiet", "--resume", "training.max_steps=6", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == "checkpoint-4"
    assert run_ids() == [first, first]  # the resumed run continues the same W&B run
    assert _run("train", recipe, "--quiet", "--overwrite", env=env, cwd=tmp_path).returncode == 0
    ids = run_ids()
    assert len(ids) == 3 and ids[2] != first and (run_dir / "wandb_run_id").read_text().strip() == ids[2]


@pytest.mark.slow
def test_tensorboard_event_files_read_back(make_recipe, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = make_recipe(training={"max_steps": 4, "logging_steps": 2}, tracking={"backend": "tensorboard"})
    result = _run("train", recipe, "--quiet", env=dict(os.environ), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/tokens_per_s", "train/samples_per_s", "train/peak_rss_gb"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert "tensorboard --logdir" in result.stdout


def test_wandb_online_without_login_is_refused_before_loading(make_recipe, tmp_path):
    recipe = make_recipe(tracking={"backend": "wandb", "mode": "online"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "no-netrc"))
    result = _run("train", recipe, "--check", env=env, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: tracking.backend: wandb (online) but this machine is not logged in" in result.stderr
    assert "wandb login" in result.stderr and "tracking.mode: offline" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_backend_and_resume_auto_are_checked(make_recipe):
    with pytest.raises(QtuneError, match="tracking.backend"):
        load_recipe(make_recipe(tracking={"backend": "comet"}))
    assert load_recipe(make_recipe(), ["training.resume=auto"]).training.resume == "auto"
    with pytest.raises(QtuneError, match="training.resume"):
        load_recipe(make_recipe(), ["training.resume=maybe"])


def test_disk_too_small_for_the_checkpoints_fails_before_training(make_recipe, tmp_path):
    from qtune.training import check_free_space

    recipe = load_recipe(make_recipe(training={"save_steps": 10, "save_total_limit": 3}))
    check_free_space(Path(recipe.output_dir), 16_384, recipe)  # a tiny adapter fits
    with pytest.raises(QtuneError, match="GiB free; this run needs about") as err:
        check_free_space(Path(recipe.output_dir), 10**15, recipe)  # 1e15 trainable parameters do not
    assert "3 checkpoint(s)" in str(err.value) and "save_total_limit" in err.value.hint
