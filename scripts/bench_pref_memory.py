"""Peak process memory of a DPO run against an SFT run of the same 4-bit model and batch (issue #16).

DPO's reference is the starting policy held as a second, frozen LoRA adapter ("ref") on the same 4-bit base, never
a second copy of the base: so a DPO run's peak should stay close to an SFT run's once the base dominates memory.
This script builds a local random model (qtune.tiny), then runs `qtune train` as separate child processes for SFT
and for DPO (same model, micro batch, max_length, steps; the DPO pairs' prompt + chosen is the SFT row), measures
each child's peak resident set (os.wait4's ru_maxrss, the whole process: imports, load, quantization, training),
repeats that and takes the median. Each child also counts, on the trainer's model, the 4-bit base weights
(bitsandbytes Params4bit: how many, their bytes, distinct storages) and the LoRA parameters per adapter, so the
table shows the DPO model holds the base once and its "ref" adapter is LoRA-sized.

    python scripts/bench_pref_memory.py                       # hidden 1024, 8 layers, 3 repeats
    python scripts/bench_pref_memory.py --hidden 256 --layers 2 --repeats 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = "zero one two three four five six seven eight nine".split()


def model_counts(model) -> dict:
    """What the trainer's model holds: the 4-bit base weights (count, packed bytes, distinct storages), the
    Linear4bit modules, and the LoRA parameters per adapter name (numel)."""
    import bitsandbytes as bnb

    quantized = [p for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)]
    storages = {p.untyped_storage().data_ptr() for p in quantized}
    adapters: dict[str, int] = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            adapter = name.split("lora_", 1)[1].split(".")[1]  # …lora_A.<adapter>.weight
            adapters[adapter] = adapters.get(adapter, 0) + param.numel()
    return {
        "linear4bit_modules": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
        "quantized_weights": len(quantized),
        "quantized_bytes": sum(p.numel() * p.element_size() for p in quantized),
        "quantized_storages": len(storages),
        "other_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        - sum(p.numel() for p in quantized),
        "lora_params": adapters,
    }


def _child(recipe: str, counts_path: str) -> int:
    """Run `qtune train RECIPE --quiet` in this process, writing model_counts of the trainer's model to counts_path."""
    import qtune.training as training
    from qtune.cli import main

    original = training.build_trainer

    def counting(prepared, model, dataset, callbacks=()):
        trainer = original(prepared, model, dataset, callbacks)
        Path(counts_path).write_text(json.dumps(model_counts(trainer.model)))
        return trainer

    training.build_trainer = counting
    try:
        main(["train", recipe, "--quiet", "--overwrite"])
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def rows(n: int, digits: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """SFT rows and DPO pairs on the same prompts: the SFT answer is the pair's chosen answer."""
    rng = random.Random(seed)
    sft, pairs = [], []
    for _ in range(n):
        ds = [rng.randrange(10) for _ in range(digits)]
        wrong = rng.choice([w for w in range(10) if w != ds[-1]])
        prompt = [{"role": "user", "content": "say the word of " + " ".join(map(str, ds))}]
        chosen = [{"role": "assistant", "content": WORDS[ds[-1]]}]
        sft.append({"messages": prompt + chosen})
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": [{"role": "assistant", "content": WORDS[wrong]}]})
    return sft, pairs


def write_recipes(folder: Path, model: Path, args) -> dict[str, Path]:
    import yaml

    sft, pairs = rows(args.rows, args.digits)
    recipes = {}
    for method, data in (("sft", sft), ("dpo", pairs)):
        data_path = folder / f"{method}.jsonl"
        data_path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        recipe = {
            "method": method,
            "model": {"name": str(model)},
            "quantization": {"bits": 4},
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0},
            "data": {"datasets": [{"path": str(data_path)}], "max_length": args.max_length, "chat_template": "chatml"},
            "training": {
                "max_steps": args.steps,
                "micro_batch_size": args.micro_batch,
                "grad_accum": 1,
                "lr": 1e-4,
                "logging_steps": 1,
            },
            "output_dir": str(folder / f"run-{method}"),
        }
        path = folder / f"{method}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        recipes[method] = path
    return recipes


def run_one(recipe: Path, folder: Path) -> dict:
    """One child run: its peak RSS (bytes, ru_maxrss from os.wait4 on that child alone), its counts, and the RSS peak
    qtune's own summary.json records."""
    import yaml

    counts_path = folder / "counts.json"
    counts_path.unlink(missing_ok=True)
    log = folder / "child.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(recipe), str(counts_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    if proc.returncode != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise SystemExit(f"{recipe.name}: qtune train failed (exit {proc.returncode})")
    run_dir = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux
        "summary_peak_rss_gb": summary.get("peak_rss_gb"),
        "counts": json.loads(counts_path.read_text()),
    }


def measure(args) -> dict:
    from qtune.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="qtune-prefmem-") as tmp:
        folder = Path(tmp)
        model = build_tiny_model(
            folder / "model",
            hidden_size=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate_size=args.intermediate,
        )
        recipes = write_recipes(folder, model, args)
        runs: dict[str, list[dict]] = {"sft": [], "dpo": []}
        for _ in range(args.repeats):
            for method in ("sft", "dpo"):  # interleaved, so drift hits both alike
                runs[method].append(run_one(recipes[method], folder))
        model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    peaks = {m: statistics.median(r["peak_rss_bytes"] for r in runs[m]) for m in runs}
    return {
        "settings": vars(args),
        "model_file_bytes": model_bytes,
        "peak_rss_bytes": {m: [r["peak_rss_bytes"] for r in runs[m]] for m in runs},
        "median_peak_rss_bytes": peaks,
        "ratio": peaks["dpo"] / peaks["sft"],
        "summary_peak_rss_gb": {m: [r["summary_peak_rss_gb"] for r in runs[m]] for m in runs},
        "counts": {m: runs[m][-1]["counts"] for m in runs},
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def table(result: dict) -> str:
    c, peaks = result["counts"], result["median_peak_rss_bytes"]
    lines = [
        "| | SFT | DPO |",
        "|---|---:|---:|",
        f"| peak RSS, median (MiB) | {_mib(peaks['sft'])} | {_mib(peaks['dpo'])} |",
        "| peak RSS, each run (MiB) | "
        + " | ".join(", ".join(_mib(x) for x in result["peak_rss_bytes"][m]) for m in ("sft", "dpo"))
        + " |",
        f"| 4-bit base weights (Params4bit) | {c['sft']['quantized_weights']} | {c['dpo']['quantized_weights']} |",
        f"| 4-bit base bytes (MiB) | {_mib(c['sft']['quantized_bytes'])} | {_mib(c['dpo']['quantized_bytes'])} |",
        f"| distinct base storages | {c['sft']['quantized_storages']} | {c['dpo']['quantized_storages']} |",
        "| LoRA params per adapter | "
        + " | ".join(", ".join(f"{k} {v:,}" for k, v in c[m]["lora_params"].items()) for m in ("sft", "dpo"))
        + " |",
    ]
    return "\n".join(lines) + f"\n\nDPO / SFT peak RSS: {result['ratio']:.3f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child(argv[1], argv[2])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--digits", type=int, default=24, help="digits per prompt (sets the row length)")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = p.parse_args(argv)
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
