"""DPO under two-process DDP on the CPU (gloo) through the real `accelerate launch qtune train …` (issue #16:
everything downstream works for every method, DDP on the CPU included): one process group, both ranks end with
identical adapters, each rank holding its frozen "ref" adapter on its own single 4-bit base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_ddp import _free_port
from test_dpo import last_digit_pairs

import qtune
from conftest import write_jsonl

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def test_two_rank_ddp_dpo_ends_with_identical_adapters(make_recipe, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", last_digit_pairs(32, seed=3))
    recipe = make_recipe(
        method="dpo",
        dpo={"beta": 0.2},
        data={"datasets": [{"path": str(pairs)}], "max_length": 48},
        training={"max_steps": 3, "micro_batch_size": 2, "logging_steps": 1},
    )
    package_dir = Path(qtune.__file__).parent
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(package_dir), "train", str(recipe), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    fingerprints = summary["adapter_fingerprint_per_rank"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert summary["steps"] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(isinstance(r.get("rewards/margins"), float) for r in records if "loss" in r)
    assert result.stdout.count("adapter saved to") == 1
    from safetensors.torch import load_file

    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert saved and not any(".ref." in k for k in saved)  # only the trained adapter is saved, not the reference
