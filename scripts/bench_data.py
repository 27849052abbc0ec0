"""Preprocessing throughput: rows/s from a file on disk to TRL-prepared (tokenized, masked) examples.

    python scripts/bench_data.py [--rows 100000] [--formats alpaca,sharegpt,...] [--num-proc 1,2]

For each format it writes ROWS synthetic rows as JSONL, then times the two stages qtune runs:
`load` (load_rows: read with `datasets`, detect, map, check every row) and `prepare` (build_dataset +
TRL's own dataset preparation through prepare_with_trl: chat template, tokenization, loss masks) with
`data.num_proc` 1 and 2, each into an empty datasets cache (`cold`: saving the rows, tokenizing, masking), then
`prepare` once more on the same data, tokenizer and template (`cached`: what a second run costs, served from
the datasets cache). The tokenizer is qtune.tiny's word-level one (ChatML template with generation markers), so
figures measure the pipeline, not a particular BPE. Results go to stdout as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = "zero one two three four five six seven eight nine".split()


def synthetic(fmt: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 12))]
        q = "spell " + " ".join(map(str, digits))
        a = " ".join(WORDS[d] for d in digits)
        if fmt == "alpaca":
            rows.append({"instruction": "spell the digits", "input": " ".join(map(str, digits)), "output": a})
        elif fmt == "sharegpt":
            rows.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        elif fmt == "messages":
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "answer in words"},
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                    ]
                }
            )
        elif fmt == "prompt_completion":
            rows.append({"prompt": q + " :", "completion": " " + a})
        else:
            rows.append({"text": f"{q} : {a} {i}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--formats", default="alpaca,sharegpt,messages,prompt_completion,text")
    ap.add_argument("--num-proc", default="1,2")
    opts = ap.parse_args()

    import datasets

    from qtune import training
    from qtune.config import Recipe
    from qtune.data.cache import build_dataset
    from qtune.data.loading import load_rows
    from qtune.data.preparation import loss_settings, prepare_with_trl
    from qtune.model import Launch
    from qtune.tiny import build_tokenizer

    datasets.disable_progress_bars()
    import trl  # noqa: F401  (imported before the clock starts: the first row must not pay for it)

    launch = Launch(1, 0, 0, "NO")
    print(
        "| format | rows | load rows/s | num_proc | prepare rows/s (cold) | end to end rows/s | prepare rows/s (cached) |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in opts.formats.split(","):
            path = Path(tmp) / f"{fmt}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in synthetic(fmt, opts.rows)), encoding="utf-8")
            for num_proc in [int(x) for x in opts.num_proc.split(",")]:
                recipe = Recipe.model_validate(
                    {
                        "model": {"name": "tiny"},
                        "data": {"datasets": [{"path": str(path)}], "max_length": 128, "num_proc": num_proc},
                        "output_dir": str(Path(tmp) / "run"),
                    }
                )
                datasets.config.HF_DATASETS_CACHE = Path(tmp) / f"cache-{fmt}-{num_proc}"  # cold: an empty cache
                started = time.perf_counter()
                schema, rows = load_rows(recipe)
                loaded = time.perf_counter()
                tokenizer = build_tokenizer()
                args = training.trainer_config(recipe, launch, loss_settings(recipe, tokenizer, schema))
                prepared = prepare_with_trl(recipe, tokenizer, build_dataset(recipe, tokenizer, schema, rows), args)
                done = time.perf_counter()
                assert len(prepared.input_ids) == opts.rows
                tokenizer = build_tokenizer()  # a second run: a fresh tokenizer, the same cache
                args = training.trainer_config(recipe, launch, loss_settings(recipe, tokenizer, schema))
                again = prepare_with_trl(recipe, tokenizer, build_dataset(recipe, tokenizer, schema, rows), args)
                cached_s = time.perf_counter() - done
                assert again.cache_files == prepared.cache_files  # served from the same cache files
                load_s, prep_s = loaded - started, done - loaded
                print(
                    f"| {fmt} | {opts.rows} | {opts.rows / load_s:,.0f} | {num_proc} | {opts.rows / prep_s:,.0f} "
                    f"| {opts.rows / (load_s + prep_s):,.0f} | {opts.rows / cached_s:,.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
