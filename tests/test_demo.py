"""The offline demo (scripts/demo.py, the README's first Quickstart command) end to end, in its quick mode:
real `qtune train` in a subprocess, then held-out accuracy before and after the adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


@pytest.mark.slow
def test_demo_quick_learns_the_task(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "demo_result.json").read_text(encoding="utf-8"))
    assert result["after_accuracy"] > result["before_accuracy"] + 0.5, result
    assert (out / "run" / "adapter" / "adapter_config.json").is_file()
    assert "before" in proc.stdout and "after" in proc.stdout
    losses = result["logged_losses"]
    assert losses and losses[-1] < losses[0], losses


@pytest.mark.slow
def test_preference_demo_quick_learns_the_preference(tmp_path):
    """scripts/demo_preference.py --quick: DPO through the real CLI; held-out preference accuracy (chosen answer more
    likely than the rejected one) from near chance to >= 80%."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(DEMO.with_name("demo_preference.py")), "--quick", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "demo_result.json").read_text(encoding="utf-8"))
    assert result["method"] == "dpo" and 0.2 <= result["before_accuracy"] <= 0.8, result
    assert result["after_accuracy"] >= 0.8 and result["after_accuracy"] >= result["before_accuracy"] + 0.3, result
    assert result["after_margin"] > result["before_margin"] + 1.0, result
    assert "held-out preference accuracy" in proc.stdout and "before  (4-bit base)" in proc.stdout
    assert (out / "run" / "rewards.png").is_file()
