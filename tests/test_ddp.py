"""Two-process DDP on the CPU (gloo) through the real `accelerate launch qtune train …`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import qtune

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_ddp_ends_with_identical_adapters(make_recipe, tmp_path):
    recipe = make_recipe(training={"max_steps": 4, "micro_batch_size": 4})
    package_dir = Path(qtune.__file__).parent  # `accelerate launch qtune …` runs the package folder as a script
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(package_dir), "train", str(recipe),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"  # one process group, not 2 lone runs
    fingerprints = summary["adapter_fingerprint_per_rank"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert summary["steps"] == 4
    # Only rank 0 writes: one adapter, one summary line printed.
    assert result.stdout.count("adapter saved to") == 1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
