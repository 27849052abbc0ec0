"""`build_dataset`: the rows as the DatasetDict TRL trains on, written once to an on-disk cache entry keyed by
their content (so TRL's own tokenization is cached next to them) and read back memory-mapped."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from qtune.config import Recipe
from qtune.data.templates import has_generation_markers, require_chat_template
from qtune.errors import QtuneError, first_line


def build_dataset(
    recipe: Recipe, tokenizer, fmt: str, rows: list[dict], args=None, stats: bool = False, tokenize: bool = True
):
    """A DatasetDict (train, and eval when data.eval_split is set) in the columns TRL trains on.

    Chats whose template lacks `{% generation %}` markers (every released template) are tokenized here, turn by
    turn (qtune.data.turns): `input_ids` + `assistant_masks`, which TRL takes as a pre-tokenized dataset, with
    every answer trained (train_on: completions) or the last one (train_on: last); with the markers (a Jinja
    string that has them), TRL's assistant-only loss covers every assistant turn. `stats=True` keeps the per-row
    turn counts (qtune.data.turns.STAT_COLUMNS) for the checks; training gets the dataset without them.
    `tokenize=False` returns the rows themselves, split the same way (`qtune eval` reads the held-out prompts and
    answers from them).

    The rows are written once (`save_to_disk`) under `<HF_DATASETS_CACHE>/qtune/<hash of the rows, the eval
    split and the seed>` and read back memory-mapped, so TRL's own `.map` steps (template, tokenization,
    masks) cache their results next to them and a second run on the same data, tokenizer and template is
    served from those files. With `args` (the run's SFTConfig) the main process writes first while the
    others wait, as TRL does for its own maps. `datasets.disable_caching()` keeps everything in memory.
    """
    import datasets

    require_chat_template(recipe, tokenizer, fmt, rows)
    eval_rows = getattr(rows, "eval_rows", None)
    train_rows = _same_columns(list(rows))
    eval_shaped = _same_columns(list(eval_rows)) if eval_rows else None
    if not eval_shaped and isinstance(recipe.data.eval_split, float) and len(train_rows) < 2:
        raise QtuneError(f"data.eval_split: {len(train_rows)} row(s) cannot be split", "add rows or drop eval_split")
    first = args.main_process_first(local=False, desc="qtune data cache") if args is not None else nullcontext()
    with first:
        if not datasets.is_caching_enabled():
            built = _in_memory(recipe, train_rows, eval_shaped)
        else:
            where = _cache_dir(recipe, train_rows, eval_shaped)
            if not (where / "dataset_dict.json").is_file():
                _write_cache(_in_memory(recipe, train_rows, eval_shaped), where)
            built = datasets.load_from_disk(str(where))
        if tokenize and per_turn_masks(recipe, tokenizer, fmt):
            built = _tokenize_turns(recipe, tokenizer, built, stats)
        if fmt == "prompt_only" and not stats:
            built = _within_prompt_budget(recipe, tokenizer, built)
    return built


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A grpo / rloo prompt's tokens as TRL's GRPO / RLOO trainers tokenize it before generating: messages through
    the chat template with the generation prompt, text with the tokenizer's special tokens."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"])  # fmt: skip
    return tokenizer(text=prompt)["input_ids"]


def _fits(row: dict, tokenizer, limit: int) -> bool:
    return len(prompt_ids(tokenizer, row["prompt"])) <= limit


def _within_prompt_budget(recipe: Recipe, tokenizer, built):
    """grpo / rloo: the prompts longer than data.max_length (the prompt budget; TRL 1.16 truncates no prompt and
    would generate after the whole of it) left out of every split. The check before training counts them and refuses
    above data.max_untrained_share (qtune.data.preparation.check_prompt_budget); `qtune data` shows the count."""
    import datasets

    limit = recipe.data.max_length
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return datasets.DatasetDict(
            {
                name: split.filter(_fits, fn_kwargs={"tokenizer": tokenizer, "limit": limit})
                for name, split in built.items()
            }
        )
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()


def _same_columns(rows: list[dict]) -> list[dict]:
    """Rows with a `tools` column among rows without: every row gets the key (Arrow takes one schema)."""
    if any("tools" in r for r in rows) and not all("tools" in r for r in rows):
        return [r if "tools" in r else {**r, "tools": None} for r in rows]
    return rows


def per_turn_masks(recipe: Recipe, tokenizer, fmt: str) -> bool:
    """Whether qtune tokenizes the chats turn by turn (a template without {% generation %} markers)."""
    return fmt == "messages" and recipe.data.train_on != "all" and not has_generation_markers(tokenizer.chat_template)


def _tokenize_turns(recipe: Recipe, tokenizer, built, stats: bool):
    """Each split mapped to input_ids + assistant_masks (cached by datasets next to the saved rows)."""
    import datasets

    from qtune.data.turns import STAT_COLUMNS, tokenize_row

    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        out = {}
        for name, split in built.items():
            mapped = split.map(
                tokenize_row,
                fn_kwargs={"tokenizer": tokenizer, "train_on": recipe.data.train_on},
                remove_columns=split.column_names,
                num_proc=recipe.data.num_proc,
            )
            out[name] = mapped if stats else mapped.remove_columns(STAT_COLUMNS)
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    return datasets.DatasetDict(out)


def _in_memory(recipe: Recipe, train_rows: list[dict], eval_rows: list[dict] | None):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(train_rows)
    if eval_rows:
        return DatasetDict(train=ds, eval=Dataset.from_list(eval_rows))
    if isinstance(recipe.data.eval_split, float):
        split = ds.train_test_split(test_size=recipe.data.eval_split, seed=recipe.training.seed)
        return DatasetDict(train=split["train"], eval=split["test"])
    return DatasetDict(train=ds)


def _cache_dir(recipe: Recipe, train_rows: list[dict], eval_rows: list[dict] | None) -> Path:
    """`<HF_DATASETS_CACHE>/qtune/<hash>`: the hash covers everything the saved rows depend on (the rows as
    mapped, mixed, deduplicated and shuffled from the sources' content by the data section and the seed, the
    eval split), so equal inputs share one entry and any change makes a new one."""
    import hashlib

    import datasets

    h = hashlib.sha256()
    header = {
        "qtune_cache": 1,
        "datasets": datasets.__version__,
        "eval_split": recipe.data.eval_split,
        "seed": recipe.training.seed,
        "named_eval": eval_rows is not None,
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    for part in (train_rows, eval_rows or []):
        h.update(b"\x00")
        for row in part:
            h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
    return Path(datasets.config.HF_DATASETS_CACHE) / "qtune" / h.hexdigest()[:24]


def _write_cache(dataset, where: Path) -> None:
    """save_to_disk into a temporary folder renamed into place, so an interrupted write leaves no half entry."""
    import os
    import shutil

    import datasets

    partial = where.with_name(f"{where.name}.partial-{os.getpid()}")
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # an internal step: no "Saving the dataset" bar
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_to_disk(str(partial))
        os.rename(partial, where)
    except OSError as exc:
        if (where / "dataset_dict.json").is_file():
            return  # another run wrote the same entry meanwhile
        raise QtuneError(
            f"data: cannot write the prepared rows to the datasets cache {where.parent}: {first_line(exc)}",
            "free disk space there, or point HF_DATASETS_CACHE at a writable folder",
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone after the rename; left by an error or Ctrl-C otherwise
        if not bars_were_off:
            datasets.enable_progress_bars()
