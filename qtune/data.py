"""Training data: read the recipe's sources, check every row, map them to the columns TRL expects.

Formats (one internal schema per format, as TRL names them):
  messages           {"messages": [{"role": ..., "content": ...}, ...]}
  prompt_completion  {"prompt": str | messages, "completion": str | messages}
  text               {"text": str}
Knows nothing about training.
"""

from __future__ import annotations

import json
from pathlib import Path

from qtune.config import DatasetSource, Recipe
from qtune.errors import QtuneError

FORMAT_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = {"system", "user", "assistant", "tool"}


def _read_rows(source: DatasetSource) -> tuple[list[dict], list[int]]:
    """Rows of a local .jsonl/.json file, through `datasets`, and the number each is reported by: its line
    in a .jsonl file (blank lines skipped by the reader still count), its 1-based position in a .json file.
    Parse errors name the file and line."""
    import datasets

    path = Path(source.path)
    where = f"data.datasets: {path}"
    if not path.is_file():
        raise QtuneError(
            f"{where}: file not found", "give a .jsonl or .json file (paths are relative to where you run qtune)"
        )
    if path.suffix not in (".jsonl", ".json"):
        raise QtuneError(
            f"{where}: unsupported file type '{path.suffix}'", "use .jsonl (one JSON object per line) or .json"
        )
    if path.stat().st_size == 0 or not path.read_text(encoding="utf-8").strip():
        raise QtuneError(f"{where}: file is empty", "add at least one row")
    line_numbers: list[int] = []
    if path.suffix == ".jsonl":
        # datasets' JSON reader does not say which line is broken; find it first.
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            line_numbers.append(number)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QtuneError(f"{where}: row {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise QtuneError(f"{where}: row {number}: expected a JSON object, got {type(row).__name__}")
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parse errors in several types
        bad = _json_syntax_error(path.read_text(encoding="utf-8")) if path.suffix == ".json" else None
        if bad:
            raise QtuneError(f"{where}: line {bad[0]}: invalid JSON ({bad[1]})") from None
        raise QtuneError(f"{where}: cannot read rows: {str(exc).splitlines()[0]}") from None
    finally:
        datasets.enable_progress_bars()
    rows = ds.to_list()
    if len(line_numbers) != len(rows):
        line_numbers = list(range(1, len(rows) + 1))
    return rows, line_numbers


def _json_syntax_error(text: str) -> tuple[int, str] | None:
    """(line, problem) where a .json file (one document, or JSON Lines under a .json name) is not valid JSON."""
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            return exc.lineno, exc.msg
    for number, line in enumerate(text.splitlines(), start=1):  # JSON Lines: the first broken line
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as exc:
            return number, exc.msg
    return None


def detect_format(columns: list[str], where: str) -> str:
    for name in ("messages", "prompt_completion", "text"):
        if all(c in columns for c in FORMAT_COLUMNS[name]):
            return name
    raise QtuneError(
        f"{where}: cannot tell the format from the columns {sorted(columns)}",
        "rows need 'messages', or 'prompt' + 'completion', or 'text' (or set the source's format:)",
    )


def _check_messages(value, where: str, key: str, need_assistant: bool) -> None:
    if not isinstance(value, list) or not value:
        raise QtuneError(f"{where}: '{key}' must be a non-empty list of {{role, content}} messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise QtuneError(f"{where}: {key}[{i}] needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise QtuneError(f"{where}: {key}[{i}].role '{message['role']}' is not one of {sorted(ROLES)}")
        if not isinstance(message["content"], str):
            raise QtuneError(f"{where}: {key}[{i}].content must be text")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise QtuneError(f"{where}: '{key}' has no assistant message to learn from")


def _check_row(row: dict, fmt: str, where: str) -> dict:
    """Validate one row of the given format and return just its schema columns."""
    missing = [c for c in FORMAT_COLUMNS[fmt] if row.get(c) in (None, "", [])]
    if missing:
        raise QtuneError(f"{where}: missing or empty {', '.join(repr(c) for c in missing)} (format {fmt})")
    if fmt == "messages":
        _check_messages(row["messages"], where, "messages", need_assistant=True)
    elif fmt == "text":
        if not isinstance(row["text"], str):
            raise QtuneError(f"{where}: 'text' must be a string")
    else:
        kinds = {type(row["prompt"]).__name__, type(row["completion"]).__name__}
        if kinds == {"str"}:
            pass
        elif kinds == {"list"}:
            _check_messages(row["prompt"], where, "prompt", need_assistant=False)
            _check_messages(row["completion"], where, "completion", need_assistant=True)
        else:
            raise QtuneError(f"{where}: 'prompt' and 'completion' must both be text or both be message lists")
    return {c: row[c] for c in FORMAT_COLUMNS[fmt]}


def load_rows(recipe: Recipe) -> tuple[str, list[dict]]:
    """Read and check every source before any model loads; returns (format, rows in that format's schema)."""
    formats, rows = set(), []
    for source in recipe.data.datasets:
        where = f"data.datasets: {source.path}"
        raw, numbers = _read_rows(source)
        fmt = source.format if source.format != "auto" else detect_format(list(raw[0]), where)
        formats.add(fmt)
        rows += [_check_row(row, fmt, f"{where}: row {n}") for n, row in zip(numbers, raw, strict=True)]
    if len(formats) > 1:
        raise QtuneError(
            f"data.datasets: sources mix formats ({', '.join(sorted(formats))})",
            "use one format across sources for now",
        )
    return formats.pop(), rows


def _has_generation_markers(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "{% generation %}" in template or "{%- generation %}" in template


def build(recipe: Recipe, tokenizer, fmt: str, rows: list[dict]):
    """A DatasetDict (train, and eval when data.eval_split is set) in the columns TRL trains on.

    With train_on: completions, chats whose template lacks `{% generation %}` markers are split into
    prompt (all turns before the last) + completion (the last assistant turn), so TRL's completion-only
    loss applies; with the markers, TRL's assistant-only loss covers every assistant turn.
    """
    from datasets import Dataset, DatasetDict

    conversational = fmt == "messages" or (fmt == "prompt_completion" and isinstance(rows[0]["prompt"], list))
    if conversational and tokenizer.chat_template is None:
        raise QtuneError(
            f"model.tokenizer: {recipe.model.tokenizer or recipe.model.name} has no chat template for the {fmt} rows",
            "use a chat/instruct tokenizer, or the text or plain prompt/completion format",
        )
    if fmt == "messages" and recipe.data.train_on == "completions" and not _has_generation_markers(tokenizer):
        rows = [_split_last_answer(row["messages"]) for row in rows]
    ds = Dataset.from_list(rows)
    if recipe.data.eval_split:
        split = ds.train_test_split(test_size=recipe.data.eval_split, seed=recipe.training.seed)
        return DatasetDict(train=split["train"], eval=split["test"])
    return DatasetDict(train=ds)


def _split_last_answer(messages: list[dict]) -> dict:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


def loss_settings(recipe: Recipe, tokenizer, fmt: str) -> dict:
    """The SFTConfig arguments that decide which tokens carry loss."""
    answers_only = recipe.data.train_on == "completions"
    if fmt == "text":
        return {"completion_only_loss": False}
    if fmt == "messages" and _has_generation_markers(tokenizer):
        return {"assistant_only_loss": answers_only}
    return {"completion_only_loss": answers_only}
