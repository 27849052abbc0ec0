"""Offline QLoRA demo: a tiny random model learns to spell digits, before/after on held-out examples.

    python scripts/demo.py              # full demo (about a minute or two on 2 CPU cores)
    python scripts/demo.py --quick      # smaller and faster (the test suite runs this)
    python scripts/demo.py --out /tmp/d # work dir (default demo-out/)

Steps: build a small random Llama-style model and word-level tokenizer on local disk (no model hub), write
a chat-format train set ("spell 4 7 2" -> "four seven two", 3-6 digits) and a disjoint held-out test set,
write a recipe (4-bit NF4 + double quant, LoRA on every linear layer), run the real CLI
(`python -m qtune train <recipe> --overwrite`), then `qtune eval <run> --data test.jsonl --base`: exact match of
greedy answers on the held-out set, the 4-bit base alone (before: the adapter disabled) and with the trained
adapter (after), written to <out>/run/eval/ (eval.json, generations.jsonl, report.html).
Writes <out>/demo_result.json; exits 1 when the adapter is not clearly better than the base.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

# Offline, always: the demo never reaches a model hub or a tracker.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
os.environ.update(OFFLINE_ENV)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One math thread (here and in the training subprocess, which inherits it): a model this small gains nothing
# from more, and on a busy machine several spinning OpenMP threads per process make training 10-30x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
WORDS = "zero one two three four five six seven eight nine".split()
MIN_DIGITS, MAX_DIGITS = 3, 6

# The tiny model. Sizes stay multiples of 16 with >= 2 KV heads (bitsandbytes' CPU 4-bit kernel);
# a wider init than the default 0.02 lets the frozen random lm_head express confident predictions.
MODEL = dict(arch="llama", hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, initializer_range=0.1)

# Per mode: training rows, optimizer steps (batch 16), peak learning rate, held-out examples per digit count.
MODES = {
    "full": dict(rows=3000, steps=500, lr=4e-3, test_per_length=25),
    "quick": dict(rows=2000, steps=400, lr=4e-3, test_per_length=10),
}


def spell(number: str) -> str:
    return " ".join(WORDS[int(d)] for d in number.split())


def random_number(rng: random.Random) -> str:
    return " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS)))


def chat(number: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": f"spell {number}"}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def make_data(rows: int, test_per_length: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint train and test numbers; the test set has the same count of every length."""
    rng = random.Random(seed)
    test: list[str] = []
    for digits in range(MIN_DIGITS, MAX_DIGITS + 1):
        seen: set[str] = set()
        while len(seen) < test_per_length:
            seen.add(" ".join(str(rng.randint(0, 9)) for _ in range(digits)))
        test += sorted(seen)
    held_out = set(test)
    train: list[str] = []
    while len(train) < rows:
        number = random_number(rng)
        if number not in held_out:
            train.append(number)
    return train, test


def write_jsonl(path: Path, numbers: list[str]) -> None:
    path.write_text("".join(json.dumps({"messages": chat(n, spell(n))}) + "\n" for n in numbers), encoding="utf-8")


def recipe_for(out: Path, model_dir: Path, train_file: Path, steps: int, lr: float, seed: int) -> dict:
    return {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"datasets": [{"path": str(train_file)}], "max_length": 64, "train_on": "completions"},
        "training": {
            "max_steps": steps,
            "micro_batch_size": 16,
            "grad_accum": 1,
            "lr": lr,
            "scheduler": "cosine",
            "warmup_ratio": 0.03,
            "gradient_checkpointing": False,  # a tiny model: memory is no issue, recomputation only costs time
            "logging_steps": max(1, steps // 10),
            "seed": seed,
        },
        "output_dir": str(out / "run"),
    }


def stream(command: list[str], **kwargs) -> tuple[int, str]:
    """Run `command`, echo its output (stdout and stderr, progress bars included) as it comes, and return
    (exit code, the output)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)
    chunks = []
    while chunk := os.read(proc.stdout.fileno(), 4096):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        chunks.append(chunk)
    return proc.wait(), b"".join(chunks).decode("utf-8", errors="replace")


def logged_losses(metrics: Path, log: str) -> list[float]:
    """The training losses qtune logged: from the run's metrics.jsonl, else from its console output."""
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [float(r["loss"]) for r in rows if r.get("loss") is not None]
    return [float(x) for x in re.findall(r"(?:'loss': '?|\| loss )([0-9.]+(?:e[+-]?[0-9]+)?)", log)]


def show_examples(answers: list[dict], side: str, k: int = 3) -> None:
    """A few of `qtune eval`'s answers (generations.jsonl records): base or tuned, against the reference."""
    picks = answers[:: max(1, len(answers) // k)][:k]
    for a in picks:
        mark = "ok " if a[f"{side}_exact_match"] else "BAD"
        prompt = a["prompt"][-1]["content"]
        print(f"    [{mark}] {prompt:<18} -> {a[side]!r:.60}   (want {a['reference']!r})")


def run_eval(run_dir: Path, test_file: Path, samples: int) -> tuple[dict, list[dict]]:
    """`qtune eval RUN --data TEST --base`, the real CLI (called in this process: no second interpreter start-up):
    eval.json's figures and generations.jsonl's answers."""
    from qtune.cli import main as qtune_main

    args = ["eval", str(run_dir), "--data", str(test_file), "--base", "-n", str(samples)]
    args += ["--max-new-tokens", str(MAX_DIGITS + 4)]  # the longest answer (6 words) and its end of turn fit
    print(f"demo: [4/4] evaluating: python -m qtune {' '.join(args)}", flush=True)
    try:
        qtune_main(args)
    except SystemExit as exc:
        if exc.code:
            raise
    folder = run_dir / "eval"
    result = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
    answers = [json.loads(line) for line in (folder / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    return result, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-out", help="work dir for the model, data, recipe and run (demo-out/)")
    parser.add_argument("--quick", action="store_true", help="fewer rows, steps and test examples (for tests)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 500, --quick 400)")
    parser.add_argument("--rows", type=int, help="training rows (default: 3000, --quick 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-gain", type=float, default=0.5, help="exit 1 unless after - before accuracy reaches this (0.5)"
    )
    args = parser.parse_args(argv)
    mode = dict(MODES["quick" if args.quick else "full"])
    mode["rows"] = args.rows or mode["rows"]
    mode["steps"] = args.steps or mode["steps"]

    # Known-harmless noise in this process: bitsandbytes' offline hub-kernel lookup, deprecations, progress bars.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    print(f"demo: [1/4] tiny random model and tokenizer -> {out / 'model'}", flush=True)
    from qtune.tiny import build_tiny_model

    model_dir = build_tiny_model(out / "model", seed=args.seed, **MODEL)

    train, test = make_data(mode["rows"], mode["test_per_length"], args.seed)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    print(
        f"demo: [2/4] {len(train)} training rows, {len(test)} held-out rows ({MIN_DIGITS}-{MAX_DIGITS} digits), "
        f'e.g. "spell {train[0]}" -> "{spell(train[0])}"',
        flush=True,
    )

    import yaml

    recipe = recipe_for(out, model_dir, out / "train.jsonl", mode["steps"], mode["lr"], args.seed)
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")

    command = [sys.executable, "-m", "qtune", "train", str(recipe_path), "--overwrite"]
    print(f"demo: [3/4] training: {' '.join(['python', *command[1:]])}", flush=True)
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    train_started = time.time()
    code, log = stream(command, env=env, cwd=out)
    train_s = time.time() - train_started
    losses = logged_losses(Path(recipe["output_dir"]) / "metrics.jsonl", log)
    if code != 0:
        print(f"demo: error: qtune train exited with {code}", file=sys.stderr)
        return code

    run_dir = Path(recipe["output_dir"])
    eval_started = time.time()
    evaluation, answers = run_eval(run_dir, out / "test.jsonl", len(test))
    eval_s = time.time() - eval_started
    before, after = evaluation["base"]["exact_match"], evaluation["tuned"]["exact_match"]
    print("demo: answers of the 4-bit base alone (before):", flush=True)
    show_examples(answers, "base")
    print("demo: answers with the trained adapter (after):", flush=True)
    show_examples(answers, "tuned")

    summary_file = Path(recipe["output_dir"]) / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    wall = time.time() - started
    result = {
        "before_accuracy": before,
        "after_accuracy": after,
        "test_examples": len(test),
        "train_rows": len(train),
        "steps": summary.get("steps", mode["steps"]),
        "train_loss": summary.get("train_loss"),
        "logged_losses": losses,
        "train_wall_time_s": round(train_s, 2),
        "eval_wall_time_s": round(eval_s, 2),
        "wall_time_s": round(wall, 2),
        "adapter": str(run_dir / "adapter"),
        "report": str(run_dir / "eval" / "report.html"),
        "per_length_after": {
            str(d): sum(a["tuned_exact_match"] for a in answers if len(a["reference"].split()) == d)
            / max(1, sum(len(a["reference"].split()) == d for a in answers))
            for d in range(MIN_DIGITS, MAX_DIGITS + 1)
        },
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    print()
    print(f"  held-out exact match ({len(test)} examples, greedy decoding; qtune eval, {eval_s:.1f}s)")
    print("  ----------------------------------------------------------")
    print(f"  before  (4-bit base)            {100 * before:6.1f}%")
    print(f"  after   (4-bit base + LoRA)     {100 * after:6.1f}%")
    print("  ----------------------------------------------------------")
    curve = f"loss {losses[0]:.2f} -> {losses[-1]:.2f}" if losses else "no loss logged"
    print(f"  training: {result['steps']} steps, {curve}, {train_s:.1f}s (qtune train, incl. startup)")
    print(f"  total wall time: {wall:.1f}s    results: {out / 'demo_result.json'}")
    print(f"  report: {run_dir / 'eval' / 'report.html'}")
    print()
    if after - before < args.min_gain:
        print(
            f"demo: FAILED: after - before = {after - before:.2f} is below --min-gain {args.min_gain}", file=sys.stderr
        )
        return 1
    print("demo: ok: the adapter learned the task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
