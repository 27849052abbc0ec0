"""`qtune eval RUN --tasks`: lm-evaluation-harness on a run's adapter and its base (qtune/harness.py).

A tiny model learns to spell one digit ("spell 3 :" → " three") in 30 steps; lm-eval then runs the two local tasks
in tests/data/harness (a ten-way multiple choice scored by loglikelihood, and greedy generation scored by exact
match; a JSON-lines file read through `dataset_path: json`, no Hub) on the adapter and, with --base, on the base
alone. The task YAMLs name their data relative to the repository root, so every call runs from there.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_qtune_in_process, write_jsonl

pytest.importorskip("lm_eval", reason="lm-eval is installed by scripts/test.sh (pip install 'qtune[harness]')")

REPO = Path(__file__).resolve().parent.parent
TASKS = "tests/data/harness"
WORDS = "zero one two three four five six seven eight nine".split()


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory) -> Path:
    """A run whose adapter spells every digit (prompt/completion text, so lm-eval's plain prompts match training)."""
    from qtune.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("harness")
    model = build_tiny_model(root / "tiny", initializer_range=0.1)
    rng = random.Random(0)
    rows = [{"prompt": f"spell {d} :", "completion": f" {WORDS[d]}"} for d in (rng.randrange(10) for _ in range(160))]
    recipe = {
        "model": {"name": str(model)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"datasets": [{"path": str(write_jsonl(root / "train.jsonl", rows))}], "max_length": 16},
        "training": {"max_steps": 30, "micro_batch_size": 16, "grad_accum": 1, "lr": 1e-2, "logging_steps": 10,
                     "warmup_ratio": 0.0, "gradient_checkpointing": False},
        "output_dir": str(root / "run"),
    }  # fmt: skip
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_qtune_in_process("train", root / "recipe.yaml", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict:
    """Every file under FOLDER (but those under `skip`) with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not str(p.relative_to(folder)).startswith(skip)
    }


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) computed here, token by token, from the model's logits."""
    import torch

    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert ids[: len(context_ids)] == context_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


@pytest.mark.slow
def test_tasks_on_the_adapter_and_the_base(harness_run):
    """The adapter answers every question (accuracy and exact match 1.0 or near), the base does not (chance is 0.1);
    the loglikelihoods lm-eval logged equal the ones computed here with the adapter on and off; results.json carries
    the command and versions; nothing in the run dir but eval/ (and qtune's manifest and lock) changed."""
    from transformers import AutoTokenizer

    from qtune.config import load_recipe
    from qtune.model import load_trained

    before = snapshot(harness_run, skip=("eval", ".qtune"))
    result = run_qtune_in_process(
        "eval", harness_run, "--tasks", "qtune_spell_mc,qtune_spell_gen", "--include-path", TASKS, "--base", cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(harness_run, skip=("eval", ".qtune")) == before

    out = harness_run / "eval" / "harness"
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    tuned, base = saved["results"]["tuned"], saved["results"]["base"]
    assert tuned["qtune_spell_mc"]["acc,none"] >= 0.9 and tuned["qtune_spell_gen"]["exact_match,strip"] >= 0.9, tuned
    assert base["qtune_spell_mc"]["acc,none"] <= 0.5 and base["qtune_spell_gen"]["exact_match,strip"] <= 0.2, base
    assert saved["n_samples"]["qtune_spell_mc"]["effective"] == 10
    assert saved["command"] == (
        f"qtune eval {harness_run} --tasks qtune_spell_mc,qtune_spell_gen --include-path {TASKS} --base"
    )
    assert saved["versions"]["lm-eval"] and saved["versions"]["peft"] and saved["quantization"].startswith("4-bit NF4")
    assert "eval" in json.loads((harness_run / ".qtune-manifest.json").read_text())["written"]
    # the printed table: one row per task and metric, base, tuned and the difference
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("qtune_spell_mc"))
    assert row[:4] == ["qtune_spell_mc", "acc", "↑", "none"]
    assert float(row[5]) == pytest.approx(tuned["qtune_spell_mc"]["acc,none"])
    assert float(row[4]) == pytest.approx(base["qtune_spell_mc"]["acc,none"])

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 40  # 2 models x 2 tasks x 10 questions
    recipe = load_recipe(harness_run / "recipe.yaml")
    assert saved["base_model"] == recipe.model.name
    model = load_trained(recipe, harness_run / "adapter")  # loaded here again: the figures below are computed anew
    tokenizer = AutoTokenizer.from_pretrained(str(harness_run / "adapter"))
    for side in ("tuned", "base"):
        sample = next(s for s in samples if s["model"] == side and s["task"] == "qtune_spell_mc" and s["doc_id"] == 3)
        logged = [resp[0][0] for resp in sample["resps"]]
        with model.disable_adapter() if side == "base" else _nothing():
            here = [continuation_logprob(model, tokenizer, "spell 3 :", f" {w}") for w in WORDS]
        assert logged == pytest.approx(here, abs=1e-4), side
        assert sample["acc"] == float(max(range(10), key=here.__getitem__) == 3)
    generated = {
        s["doc"]["word"]: s["filtered_resps"][0] for s in samples if s["model"] == "tuned" and "exact_match" in s
    }
    assert sum(word == answer for word, answer in generated.items()) >= 9, generated


def _nothing():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.slow
def test_a_second_run_replaces_harness_results_and_keeps_the_rest_of_eval(harness_run):
    """--limit 3 without --base: eval/harness/ holds that run alone (3 examples, no base); a file that `qtune eval`'s
    other outputs put in eval/ is left as it was."""
    (harness_run / "eval").mkdir(exist_ok=True)
    (harness_run / "eval" / "eval.json").write_text('{"from": "qtune eval"}\n', encoding="utf-8")
    result = run_qtune_in_process(
        "eval", harness_run, "--tasks", "qtune_spell_mc", "--include-path", TASKS, "--limit", "3", "--quiet", cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((harness_run / "eval" / "harness" / "results.json").read_text(encoding="utf-8"))
    assert set(saved["results"]) == {"tuned"} and set(saved["results"]["tuned"]) == {"qtune_spell_mc"}
    assert saved["n_samples"]["qtune_spell_mc"]["effective"] == 3 and saved["settings"]["limit"] == 3
    assert (harness_run / "eval" / "eval.json").read_text(encoding="utf-8") == '{"from": "qtune eval"}\n'
    assert sorted(p.name for p in (harness_run / "eval").iterdir()) == ["eval.json", "harness"]  # no staging left
    assert "base" not in result.stdout.splitlines()[0].split()


@pytest.mark.slow
def test_an_unknown_task_is_refused_with_close_names(harness_run):
    """A misspelt name: one error line listing lm-eval's close names (its own tasks and --include-path's), exit 2,
    before the model loads; nothing in the run dir changes."""
    before = snapshot(harness_run)
    result = run_qtune_in_process(
        "eval", harness_run, "--tasks", "qtune_spell_mc,hellaswg", "--include-path", TASKS, cwd=REPO
    )
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()
    assert error[0].startswith("error: --tasks: lm-eval does not know 'hellaswg' (close: hellaswag"), error
    assert "qtune_spell_mc" not in error[0] and error[1].startswith("  hint: `lm-eval ls tasks`")
    assert snapshot(harness_run) == before


def test_refusals_before_anything_loads(tmp_path, monkeypatch):
    """lm-eval missing (the install line), not a run directory, bad --limit / --include-path: one error line each,
    exit 2, nothing written."""
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n", encoding="utf-8")

    def refused(*args, **kwargs):
        result = run_qtune_in_process("eval", *args, cwd=REPO, **kwargs)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len([line for line in lines if line.startswith("error: ")]) == 1, lines
        return lines

    lines = refused(folder, "--tasks", "hellaswag", "--limit", "1.5")
    assert lines[0].startswith("error: --limit: 1.5 is neither")
    lines = refused(folder, "--tasks", " , ")
    assert lines[0] == "error: --tasks: no task name given"
    lines = refused(folder, "--tasks", "hellaswag", "--include-path", tmp_path / "missing")
    assert lines[0] == f"error: --include-path: {tmp_path / 'missing'} is not a directory"
    lines = refused(folder, "--tasks", "hellaswag")
    assert "not a qtune run directory" in lines[0]

    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "lm_eval", None)  # import lm_eval fails as when it is not installed
        lines = refused(folder, "--tasks", "hellaswag")
    assert lines == [
        "error: --tasks runs lm-evaluation-harness, which is not installed (the lm-eval package)",
        "  hint: pip install 'qtune[harness]'",
    ]
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
