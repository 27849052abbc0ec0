"""scripts/bench.py --smoke: both configs run as subprocesses and the report holds what the issue asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_reports_both_configs(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "scripts/bench.py", "--smoke", "--steps", "5", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    stock, qtune = report["results"]
    assert (stock["config"], qtune["config"]) == ("stock", "qtune")
    for r in (stock, qtune):
        assert r["tokens_per_s"] > 0 and r["steps_measured"] >= 1
        assert 0 < r["time_to_first_step_s"] < r["wall_s"]
        assert r["peak_rss_gib"] > 0.05  # a real process, CPU: resident memory
    # The stock recipe pads to the longest row in each batch; both count only non-padding tokens, and qtune's
    # packed rows hold more real tokens per step than unpacked ones whose median is far below max_length.
    assert qtune["tokens"] > stock["tokens"]
    assert report["data"]["median_tokens"] < report["max_length"] / 3
    assert "| stock |" in done.stdout and "ratio vs stock" in done.stdout
