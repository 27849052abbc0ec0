"""Training throughput: the stock HF-docs QLoRA recipe against qtune's own path, same model, same data.

    python scripts/bench.py --smoke                                      # CPU, tiny shapes, ~1 minute
    python scripts/bench.py --shape meta-llama/Llama-2-7b-hf             # GPU: Llama-2-7B shape, max_length 2048
    python scripts/bench.py --shape meta-llama/Llama-3.2-1B --steps 30 --json out.json

One invocation, one subprocess per config (so peak memory and start-up are each process's own):
  stock  written directly against the libraries as the HF docs show it: BitsAndBytesConfig NF4 + double
         quant, prepare_model_for_kbit_training (gradient checkpointing), LoRA all-linear r 16, TRL SFTTrainer
         with peft_config, no packing; dataset_text_field "text".
  qtune  `python -m qtune train` on the equivalent recipe with qtune's settings (packing on).
The model is randomly initialised with the architecture of `--shape` (qtune.estimate's offline table; `--smoke`
shrinks it) and saved locally with qtune.tiny's word-level tokenizer; the data are synthetic texts whose
lengths follow a log-normal spread with median ≈ 300 tokens, capped at 2048 (both scaled by max_length/2048).

Measured per config: non-padding tokens/s (median over the steps after --warmup; the Trainer's
non-padding token count, per optimizer step: a callback in the stock script, qtune's metrics.jsonl, which
records the same count per log step), peak allocated / reserved GPU memory (or peak RSS of the process on the
CPU), time to first step (from launching the subprocess to the end of optimizer step 1). Prints a Markdown
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
GiB = 1024**3

SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip


# ----------------------------------------------------------------------------------------- setup (parent)
def build_model(out: Path, shape: str, smoke: bool, layers: int | None, max_length: int) -> Path:
    """A random model with `shape`'s architecture (shrunk for --smoke) and qtune.tiny's tokenizer, saved to out."""
    import torch
    import transformers

    from qtune.estimate import model_config
    from qtune.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = model_config(shape)
    for key, value in (SMOKE_SHAPE if smoke else {}).items():
        setattr(config, key, value)
    if layers:
        config.num_hidden_layers = layers
        if hasattr(config, "layer_types") and config.layer_types:
            config.layer_types = config.layer_types[:layers]
    config.vocab_size = max(config.vocab_size if not smoke else 0, -(-len(tokenizer) // 16) * 16)
    config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0) or 0, max_length)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_data(path: Path, rows: int, max_length: int, seed: int = 0) -> dict:
    """Texts of word tokens (one token per word in the tiny tokenizer): log-normal lengths, median ≈ 300 and
    max 2048 at max_length 2048, scaled with max_length."""
    from qtune.tiny import BASE_WORDS

    rng = random.Random(seed)
    scale = max_length / 2048
    median, cap = 300 * scale, max_length - 2  # room for bos/eos
    lengths = [max(4, min(cap, int(rng.lognormvariate(math.log(median), 0.8)))) for _ in range(rows)]
    with path.open("w", encoding="utf-8") as f:
        for n in lengths:
            f.write(json.dumps({"text": " ".join(rng.choice(BASE_WORDS) for _ in range(n))}) + "\n")
    ordered = sorted(lengths)
    return {"rows": rows, "median_tokens": ordered[rows // 2], "max_tokens": ordered[-1]}


# ----------------------------------------------------------------------------------------- stock (worker)
def run_stock(cfg: dict) -> dict:
    """The recipe a user writes from the HF docs, on the libraries directly."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(
        cfg["model"], quantization_config=bnb, dtype=dtype, device_map={"": 0} if cuda else None
    )
    model = prepare_model_for_kbit_training(model)  # gradient checkpointing on, the docs' default
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=cfg["workdir"] + "/stock",
        per_device_train_batch_size=cfg["micro_batch"],
        gradient_accumulation_steps=1,
        max_steps=cfg["steps"],
        learning_rate=2e-4,
        logging_steps=1,
        max_length=cfg["max_length"],
        packing=False,
        gradient_checkpointing=True,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        save_strategy="no",
        report_to="none",
        dataset_text_field="text",
        include_num_input_tokens_seen="non_padding",  # measurement only: sums attention_mask per batch
        disable_tqdm=True,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.steps.append((time.time(), state.num_input_tokens_seen))

    timer = StepTimer()
    dataset = load_dataset("json", data_files=cfg["data"], split="train")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora, callbacks=[timer]
    )
    trainer.train()
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(timer.steps, timer.steps[1:], strict=False) if b[0] > a[0]]
    return {
        "tokens_per_s_each_step": rates,  # from step 2 on
        "first_step_at": timer.steps[0][0],
        "tokens": timer.steps[-1][1],
        **_peak(),
    }


def _peak() -> dict:
    import resource

    import torch

    if torch.cuda.is_available():
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        }
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB}


# ----------------------------------------------------------------------------------------- qtune
def qtune_recipe(cfg: dict) -> Path:
    import yaml

    recipe = {
        "model": {"name": cfg["model"]},
        "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"datasets": [{"path": cfg["data"], "format": "text"}], "max_length": cfg["max_length"],
                 "packing": True, "train_on": "all"},
        "training": {"max_steps": cfg["steps"], "micro_batch_size": cfg["micro_batch"], "grad_accum": 1, "lr": 2e-4,
                     "logging_steps": 1, "gradient_checkpointing": True, "save_steps": None},
        "output_dir": cfg["workdir"] + "/qtune-run",
    }  # fmt: skip
    path = Path(cfg["workdir"]) / "qtune.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def read_qtune(cfg: dict) -> dict:
    run = Path(cfg["workdir"]) / "qtune-run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    summary = json.loads((run / "summary.json").read_text())
    peak = (
        {"peak_rss_gib": summary["peak_rss_gb"]}
        if "peak_rss_gb" in summary
        else {"peak_allocated_gib": summary.get("peak_mem_gb"), "peak_reserved_gib": summary.get("peak_reserved_gb")}
    )  # fmt: skip  (qtune.monitor's "gb" are GiB: bytes / 1024**3)
    return {
        "tokens_per_s_each_step": [r["tokens_per_s"] for r in steps[1:]],
        "first_step_at": steps[0]["time"],
        "tokens": summary["tokens"],
        **peak,
    }


# ----------------------------------------------------------------------------------------- driver
def run_config(name: str, cfg: dict) -> dict:
    started = time.time()
    if name == "stock":
        result_path = Path(cfg["workdir"]) / "stock.json"
        cmd = [sys.executable, __file__, "--worker", json.dumps(cfg), "--result", str(result_path)]
    else:
        cmd = [sys.executable, "-m", "qtune", "train", str(qtune_recipe(cfg)), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        raise SystemExit(
            f"bench: {name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    raw = json.loads(result_path.read_text()) if name == "stock" else read_qtune(cfg)
    rates = raw["tokens_per_s_each_step"][max(0, cfg["warmup"] - 1) :] or raw["tokens_per_s_each_step"]
    return {
        "config": name,
        "tokens_per_s": statistics.median(rates),
        "steps_measured": len(rates),
        "time_to_first_step_s": raw["first_step_at"] - started,
        "wall_s": time.time() - started,
        "tokens": raw["tokens"],
        **{k: v for k, v in raw.items() if k.startswith("peak")},
    }


def table(results: list[dict]) -> str:
    mem_cols = [k for k in ("peak_allocated_gib", "peak_reserved_gib", "peak_rss_gib") if k in results[0]]
    head = ["config", "non-pad tokens/s (median)", *[k.replace("_gib", " GiB") for k in mem_cols],
            "time to first step s", "ratio vs stock"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stock = results[0]["tokens_per_s"]
    for r in results:
        cells = [r["config"], f"{r['tokens_per_s']:,.0f}", *[f"{r[k]:.3f}" for k in mem_cols],
                 f"{r['time_to_first_step_s']:.1f}", f"{r['tokens_per_s'] / stock:.2f}x"]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="meta-llama/Llama-2-7b-hf", help="architecture (qtune estimate's table)")
    p.add_argument("--layers", type=int, help="fewer decoder layers than the shape has")
    p.add_argument("--smoke", action="store_true", help="CPU smoke: tiny shapes, max_length 256, 8 steps")
    p.add_argument("--max-length", type=int)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--configs", default="stock,qtune")
    p.add_argument("--json", help="write the results here (also printed)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        Path(a.result).write_text(json.dumps(run_stock(json.loads(a.worker))))
        return

    import torch

    import qtune

    max_length = a.max_length or (256 if a.smoke else 2048)
    steps = a.steps or (8 if a.smoke else 20)
    with tempfile.TemporaryDirectory(prefix="qtune-bench-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model", a.shape, a.smoke, a.layers, max_length)
        data = write_data(work / "train.jsonl", steps * a.micro_batch * 10 + 64, max_length)
        cfg = {"model": str(model), "data": str(work / "train.jsonl"), "workdir": tmp, "max_length": max_length,
               "micro_batch": a.micro_batch, "steps": steps, "warmup": a.warmup}  # fmt: skip
        results = [run_config(name, cfg) for name in a.configs.split(",")]
    import bitsandbytes
    import peft
    import transformers
    import trl

    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__, "bitsandbytes": bitsandbytes.__version__, "qtune": qtune.__version__},
        "shape": a.shape + (" (smoke: hidden 64, 2 layers)" if a.smoke else "") + (f", {a.layers} layers" if a.layers else ""),
        "max_length": max_length, "micro_batch": a.micro_batch, "steps": steps, "data": data,
        "command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]),
        "results": results,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    print()
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
