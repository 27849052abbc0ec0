"""Training data: read the recipe's sources, check every row, map them to the one schema TRL trains on.

  sources   local .jsonl/.json/.csv/.parquet/.txt files, folders of them, `save_to_disk` folders, Hub names
  formats   alpaca, sharegpt, messages, prompt_completion, text (+ a per-source column mapping), each
            mapped to one internal schema, as TRL names it:
              messages           {"messages": [{"role": ..., "content": ...}, ...]}   (alpaca, sharegpt too)
              prompt_completion  {"prompt": str | messages, "completion": str | messages}
              text               {"text": str}
  templates the tokenizer's chat template, a built-in with {% generation %} markers, or a Jinja string
  checks    bad rows stop with file + row (or are skipped, counted); before any model loads, the prepared
            data is checked for the silent killers (end-of-turn never trained, untrained examples, a
            built-in template that renders differently from the tokenizer's own)

Tokenization, loss masks, truncation and packing are TRL's (SFTTrainer's dataset preparation); `prepare`
runs exactly that preparation for `qtune data` and the checks. Knows nothing about the training loop.
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from qtune.config import DatasetSource, Recipe
from qtune.errors import QtuneError

SCHEMAS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
FORMAT_SCHEMA = {
    "alpaca": "messages",
    "sharegpt": "messages",
    "messages": "messages",
    "prompt_completion": "prompt_completion",
    "text": "text",
}
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
CHECK_SAMPLE = 512  # rows `train` checks through TRL's preparation before the model loads


# --------------------------------------------------------------------------- built-in chat templates
# Each renders like the model family's own template and wraps every assistant answer, with its
# end-of-turn token, in {% generation %} so TRL's assistant_only_loss trains exactly those tokens.

_ALTERNATE = (
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
)
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama-3": (
        "{% for message in messages %}"
        "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "llama-2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}" + _ALTERNATE + "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{% generation %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endgeneration %}{% endif %}"
        "{% endfor %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] + '\\n\\n' %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}"
        "{{ bos_token }}{% for message in loop_messages %}" + _ALTERNATE + "{% if message['role'] == 'user' %}"
        "{% if loop.index0 == 0 %}{{ '[INST] ' + system_message + message['content'] + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% endif %}"
        "{% endfor %}"
    ),
    "zephyr": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}

# Conversations a template is rendered on to compare it with the tokenizer's own.
_PROBES = (
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "no"},
    ],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}],
)


class BadRow(Exception):
    """One row that cannot be used; the message says why (the caller adds file and row)."""


class Rows(list):
    """The training rows in one schema (a list of dicts), plus what loading found out about them."""

    def __init__(self, rows=(), schema: str = "", eval_rows: list[dict] | None = None):
        super().__init__(rows)
        self.schema = schema
        self.eval_rows = eval_rows
        self.where: list[str] = []  # "file: row N" for each row, for errors found later (template render)
        self.sources: list[dict] = []  # per source: path, format, detected, rows read, rows kept, skipped
        self.notes: list[str] = []


# --------------------------------------------------------------------------- reading sources


def _scan_lines(path: Path, kind: str, where: str, on_bad_row: str) -> tuple[list[int], Counter, list[str]]:
    """Line-level problems in a text file (non-UTF-8 bytes, a JSONL line that is not a JSON object, a ragged
    CSV row). Returns the numbers of the usable lines, the skipped reasons, and the good lines' text."""
    skipped: Counter = Counter()
    numbers: list[int] = []
    good: list[str] = []

    def bad(number: int, reason: str, detail: str) -> None:
        if on_bad_row == "error":
            raise QtuneError(
                f"{where}: row {number}: {detail}", "fix or remove the row, or set data.on_bad_row: skip to drop it"
            )
        skipped[reason] += 1

    raw_lines = path.read_bytes().split(b"\n")
    header_fields = None
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad(number, "not UTF-8", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
            continue
        if not line.strip():
            continue
        if kind == "json":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad(number, "invalid JSON", f"invalid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                bad(number, "not a JSON object", f"expected a JSON object, got {type(row).__name__}")
                continue
        elif kind == "csv":
            try:
                fields = next(csv.reader(io.StringIO(line)))
            except (csv.Error, StopIteration):
                fields = []
            if header_fields is None:
                header_fields = len(fields)
            elif len(fields) != header_fields and '"' not in line:  # quoted fields may span lines
                bad(number, "ragged CSV row", f"{len(fields)} fields where the header has {header_fields}")
                continue
        numbers.append(number)
        good.append(line)
    return numbers, skipped, good


def _load_local_file(source: DatasetSource, path: Path, where: str, on_bad_row: str):
    """(datasets.Dataset, row numbers, skipped) for one local file; row numbers are file lines where lines
    are rows (JSONL, CSV, text), positions otherwise."""
    import datasets

    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise QtuneError(f"{where}: unsupported file type '{path.suffix}'", "use .jsonl, .json, .csv, .parquet or .txt")
    kind = LOCAL_SUFFIXES[suffix]
    if path.stat().st_size == 0 or (kind != "parquet" and not path.read_bytes().strip()):
        raise QtuneError(f"{where}: file is empty", "add at least one row")
    skipped: Counter = Counter()
    numbers: list[int] | None = None
    good: list[str] = []
    line_rows = kind in ("csv", "text") or suffix == ".jsonl"
    if line_rows:
        numbers, skipped, good = _scan_lines(path, kind, where, on_bad_row)
        if kind == "csv":
            numbers = numbers[1:]  # the header
    elif kind == "json":
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise QtuneError(f"{where}: line {line}: not valid UTF-8") from None
    if skipped:
        # Load what is left; datasets' readers stop at the first bad line.
        if kind == "json":
            rows = [json.loads(line) for line in good]
        elif kind == "csv":
            rows = list(csv.DictReader(io.StringIO("\n".join(good))))
        else:
            rows = [{"text": line} for line in good]
        if not rows:
            raise QtuneError(f"{where}: no usable rows ({_count_text(skipped)} skipped)")
        keys = list(dict.fromkeys(k for row in rows for k in row))  # from_list would keep the first row's keys only
        return datasets.Dataset.from_list([{k: row.get(k) for k in keys} for row in rows]), numbers, skipped
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parse errors in several types
        bad = _json_syntax_error(path.read_text(encoding="utf-8")) if suffix == ".json" else None
        if bad:
            raise QtuneError(f"{where}: line {bad[0]}: invalid JSON ({bad[1]})") from None
        raise QtuneError(f"{where}: cannot read rows: {_first_line(exc)}") from None
    if numbers is None or len(numbers) != len(ds):
        numbers = list(range(1, len(ds) + 1))
    return ds, numbers, skipped


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


def _pick_split(ds, source: DatasetSource, split: str, where: str):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise QtuneError(
                f"{where}: no split '{split}' (splits: {', '.join(ds)})", "set the source's split: to one of them"
            )
        return ds[split]
    if split != "train":
        raise QtuneError(f"{where}: a single-split dataset has no split '{split}'", "drop split: (it is 'train')")
    return ds


def _load_source(source: DatasetSource, split: str, on_bad_row: str):
    """(datasets.Dataset, row numbers, skipped reasons, where) for one source and split."""
    import datasets

    where = f"data.datasets: {source.path}" + (f" [{split}]" if split != "train" else "")
    path = Path(source.path)
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        if path.is_file():
            if split != "train":
                raise QtuneError(f"{where}: a single file has no split '{split}'", "give eval_split as a fraction")
            return (*_load_local_file(source, path, where, on_bad_row), where)
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as exc:
                raise QtuneError(f"{where}: cannot read the save_to_disk folder: {_first_line(exc)}") from None
            ds = _pick_split(ds, source, split, where)
            return ds, list(range(1, len(ds) + 1)), Counter(), where
        looks_local = path.is_absolute() or source.path.startswith(".") or path.suffix.lower() in LOCAL_SUFFIXES
        if not path.exists() and looks_local:
            raise QtuneError(
                f"{where}: file not found",
                "give a .jsonl, .json, .csv, .parquet or .txt file, a folder, or a Hub dataset name "
                "(paths are relative to where you run qtune)",
            )
        try:
            ds = datasets.load_dataset(source.path, source.name, split=split, revision=source.revision)
        except Exception as exc:
            kind = "folder" if path.is_dir() else "Hub dataset"
            raise QtuneError(
                f"{where}: cannot load the {kind}: {_first_line(exc)}",
                "check name/split/revision; Hub datasets need network access or a filled HF cache",
            ) from None
        return ds, list(range(1, len(ds) + 1)), Counter(), where
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------- formats


def detect_format(columns: list[str], first_row: dict | None, where: str) -> str:
    """The format the columns (after the source's mapping) fit, or an error listing them."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        turns = (first_row or {}).get("conversations") or []
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        return "messages" if "role" in first and "from" not in first else "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise QtuneError(
        f"{where}: cannot tell the format from the columns {sorted(columns)}",
        "rows need 'messages', 'conversations' (sharegpt), 'instruction' + 'output' (alpaca), 'prompt' + "
        "'completion', or 'text'; or set the source's format: and map names with columns: {field: column}",
    )


def _text(value, key: str, required: bool = True) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BadRow(f"missing, null or empty '{key}'")
        return ""
    if not isinstance(value, str):
        raise BadRow(f"'{key}' must be text, got {type(value).__name__}")
    return value


def _check_messages(value, key: str, need_assistant: bool) -> list[dict]:
    """A clean copy of a role/content message list, or BadRow saying what is wrong."""
    if not isinstance(value, list) or not value:
        raise BadRow(f"'{key}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") is None or "content" not in message:
            raise BadRow(f"{key}[{i}] needs 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise BadRow(f"{key}[{i}].role '{role}' is not one of {sorted(ROLES)}")
        content = message["content"]
        if content is None or not isinstance(content, str):
            raise BadRow(f"{key}[{i}].content must be text, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise BadRow(f"{key}[{i}] is an empty assistant answer")
        out.append({"role": role, "content": content})
    if need_assistant:
        _check_order(out, key)
    return out


def _check_order(messages: list[dict], key: str) -> None:
    """system (first only), then user and assistant alternating (tool results between), an answer in it."""
    previous = None
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i != 0:
            raise BadRow(f"wrong role order: {key}[{i}] is a system message after the start")
        if role == "assistant" and previous not in ("user", "tool"):
            raise BadRow(f"wrong role order: {key}[{i}] (assistant) follows {previous or 'nothing'}, not user")
        if role == "user" and previous == "user":
            raise BadRow(f"wrong role order: {key}[{i}] is a second user message in a row")
        if role == "tool" and previous not in ("assistant", "tool"):
            raise BadRow(f"wrong role order: {key}[{i}] (tool) does not follow an assistant call")
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(f"'{key}' has no assistant message to learn from")


def _map_row(row: dict, fmt: str, roles: dict[str, str]) -> dict:
    """One row of `fmt` mapped to its schema's columns, or BadRow."""
    if fmt == "messages":
        key = "messages" if "messages" in row else "conversations"
        return {"messages": _check_messages(row.get(key), key, need_assistant=True)}
    if fmt == "alpaca":
        instruction = _text(row.get("instruction"), "instruction")
        extra = _text(row.get("input"), "input", required=False)
        output = _text(row.get("output"), "output")
        system = _text(row.get("system"), "system", required=False)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages = [{"role": "system", "content": system}] if system.strip() else []
        return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": output}]}
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise BadRow("'conversations' must be a non-empty list of {from, value} turns")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") is None or "value" not in turn:
                raise BadRow(f"conversations[{i}] needs 'from' and 'value'")
            if turn["from"] not in roles:
                raise BadRow(
                    f"conversations[{i}].from '{turn['from']}' is not a known speaker "
                    f"(known: {', '.join(sorted(roles))}; add it with the source's roles: {{name: role}})"
                )
            messages.append({"role": roles[turn["from"]], "content": turn["value"]})
        return {"messages": _check_messages(messages, "conversations", need_assistant=True)}
    if fmt == "text":
        return {"text": _text(row.get("text"), "text")}
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise BadRow("'prompt' and 'completion' must both be text or both be message lists")
        p = _check_messages(prompt, "prompt", need_assistant=False)
        c = _check_messages(completion, "completion", need_assistant=False)
        _check_order(p + c, "prompt + completion")
        if not any(m["role"] == "assistant" for m in c):
            raise BadRow("'completion' has no assistant message to learn from")
        return {"prompt": p, "completion": c}
    return {"prompt": _text(prompt, "prompt"), "completion": _text(completion, "completion")}


def _rename(row: dict, columns: dict[str, str] | None) -> dict:
    if not columns:
        return row
    inverse = {column: name for name, column in columns.items()}
    return {inverse.get(k, k): v for k, v in row.items()}


def _read_split(source: DatasetSource, split: str, recipe: Recipe, index: int) -> tuple[str, list, list, dict]:
    """(schema, rows, where-labels, report) for one source and split: read, map, check every row."""
    on_bad_row = recipe.data.on_bad_row
    ds, numbers, skipped, where = _load_source(source, split, on_bad_row)
    columns = list(ds.column_names)
    if source.columns:
        missing = [c for c in source.columns.values() if c not in columns]
        if missing:
            raise QtuneError(
                f"data.datasets.{index}.columns: {', '.join(repr(c) for c in missing)} not among the columns "
                f"{sorted(columns)} of {source.path}"
            )
        inverse = {column: name for name, column in source.columns.items()}
        columns = [inverse.get(c, c) for c in columns]
    raw = ds.to_list()
    if not raw:
        raise QtuneError(f"{where}: no rows", "add at least one row")
    detected = source.format == "auto"
    fmt = detect_format(columns, _rename(raw[0], source.columns), where) if detected else source.format
    if not detected and fmt == "messages" and "messages" not in columns and "conversations" not in columns:
        raise QtuneError(f"{where}: format messages needs a 'messages' column; columns: {sorted(columns)}")
    if not detected and fmt != "messages":
        needed = [c for c in FORMAT_FIELDS[fmt] if c not in ("input", "system")]
        absent = [c for c in needed if c not in columns]
        if absent:
            raise QtuneError(
                f"{where}: format {fmt} needs column(s) {', '.join(absent)}; columns: {sorted(columns)}",
                "map them with the source's columns: {field: column}",
            )
    roles = {**SHAREGPT_ROLES, **(source.roles or {})}
    bad_role = [r for r in (source.roles or {}).values() if r not in ROLES]
    if bad_role:
        raise QtuneError(f"data.datasets.{index}.roles: {bad_role[0]!r} is not one of {sorted(ROLES)}")
    rows, labels = [], []
    first_skip = None
    line_skips = sum(skipped.values())
    for number, row in zip(numbers, raw, strict=True):
        try:
            rows.append(_map_row(_rename(row, source.columns), fmt, roles))
        except BadRow as exc:
            if on_bad_row == "error":
                raise QtuneError(
                    f"{where}: row {number}: {exc} (format {fmt})",
                    "fix or remove the row, or set data.on_bad_row: skip to drop bad rows (counted)",
                ) from None
            skipped[str(exc).split(":")[0].split("[")[0].strip("' ")] += 1
            first_skip = first_skip or f"row {number}: {exc}"
            continue
        labels.append(f"{where}: row {number}")
    used = set(FORMAT_FIELDS[fmt]) | ({"conversations"} if fmt == "messages" else set())
    ignored = [c for c in columns if c not in used]
    report = {
        "source": source.path,
        "split": split,
        "format": fmt,
        "detected": detected,
        "read": len(raw) + line_skips,
        "kept": len(rows),
        "skipped": dict(skipped),
        "first_skipped": first_skip,
        "ignored_columns": ignored,
    }
    if not rows:
        raise QtuneError(f"{where}: every row was skipped ({_count_text(skipped)})", first_skip)
    return FORMAT_SCHEMA[fmt], rows, labels, report


def _count_text(counts: Counter | dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _schema_of(schema: str, rows: list[dict]) -> str:
    """prompt_completion splits into text pairs and conversational pairs, which TRL cannot mix."""
    if schema == "prompt_completion" and isinstance(rows[0]["prompt"], list):
        return "prompt_completion (conversational)"
    return schema


def _amount(source: DatasetSource, rows: list, labels: list, rng: random.Random) -> tuple[list, list]:
    """Rows after the source's samples/weight: a seeded sample, repeating whole passes first."""
    n = len(rows)
    want = source.samples if source.samples is not None else round(n * (source.weight or 1.0))
    if want == n:
        return rows, labels
    order = list(range(n)) * (want // n) + rng.sample(range(n), want % n)
    return [rows[i] for i in order], [labels[i] for i in order]


def load_rows(recipe: Recipe) -> tuple[str, Rows]:
    """Read and check every source before any model loads. Returns (schema, rows): rows mapped to one schema
    (messages, prompt_completion or text), mixed per samples/weight, deduplicated on request and shuffled
    by training.seed; `rows.eval_rows` holds a named eval split's rows."""
    d = recipe.data
    rng = random.Random(recipe.training.seed)
    schemas: dict[str, str] = {}
    train, labels, reports = [], [], []
    eval_rows: list[dict] | None = [] if isinstance(d.eval_split, str) else None
    for index, source in enumerate(d.datasets):
        schema, rows, where, report = _read_split(source, source.split, recipe, index)
        schemas[_schema_of(schema, rows)] = source.path
        rows, where = _amount(source, rows, where, rng)
        report["used"] = len(rows)
        train += rows
        labels += where
        reports.append(report)
        if eval_rows is not None:
            _, rows, _, eval_report = _read_split(source, d.eval_split, recipe, index)
            eval_rows += rows
            report["eval_rows"] = len(rows)
    if len(schemas) > 1:
        raise QtuneError(
            "data.datasets: sources map to different schemas ("
            + "; ".join(f"{path}: {schema}" for schema, path in schemas.items())
            + ")",
            "alpaca, sharegpt and messages mix (all are chats); text or prompt/completion sources must not "
            "be mixed with chats",
        )
    notes = []
    if d.dedup:
        seen, kept, kept_labels = set(), [], []
        for row, label in zip(train, labels, strict=True):
            key = json.dumps(row, sort_keys=True, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                kept.append(row)
                kept_labels.append(label)
        if len(kept) < len(train):
            notes.append(f"dedup dropped {len(train) - len(kept)} duplicate rows")
        train, labels = kept, kept_labels
    order = list(range(len(train)))
    rng.shuffle(order)
    result = Rows([train[i] for i in order], schema=next(iter(schemas)).split(" ")[0], eval_rows=eval_rows)
    result.where = [labels[i] for i in order]
    result.sources = reports
    result.notes = notes
    return result.schema, result


def describe_sources(rows: Rows) -> list[str]:
    """One line per source: what was read, detected, kept, skipped, ignored."""
    lines = []
    for r in rows.sources:
        how = "detected" if r["detected"] else "set"
        line = f"{r['source']} [{r['split']}]: format {r['format']} ({how}), {r['kept']} rows"
        if r.get("used") is not None and r["used"] != r["kept"]:
            line += f", {r['used']} used after samples/weight"
        if r.get("eval_rows") is not None:
            line += f", {r['eval_rows']} eval rows"
        if r["skipped"]:
            line += f"; skipped {sum(r['skipped'].values())} ({_count_text(r['skipped'])}), first: {r['first_skipped']}"
        if r["ignored_columns"]:
            line += f"; ignored columns: {', '.join(r['ignored_columns'])}"
        lines.append(line)
    return lines + rows.notes


def warn_skipped(rows: Rows) -> None:
    """Counted warnings for skipped rows (on_bad_row: skip), on stderr."""
    for r in rows.sources:
        if r["skipped"]:
            n = sum(r["skipped"].values())
            print(
                f"qtune: warning: {r['source']}: skipped {n} bad row(s) ({_count_text(r['skipped'])}); "
                f"first: {r['first_skipped']}",
                file=sys.stderr,
            )


# --------------------------------------------------------------------------- templates


def _has_generation_markers(template: str | None) -> bool:
    import re

    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", template or ""))


def use_chat_template(recipe: Recipe, tokenizer) -> None:
    """Set the recipe's chat template on the tokenizer (it is saved with the adapter). A built-in name must
    render like the tokenizer's own template, if it has one: it only adds the {% generation %} markers."""
    choice = recipe.data.chat_template
    if choice is None or tokenizer.chat_template == TEMPLATES.get(choice, choice):
        return
    if choice in TEMPLATES:
        own = tokenizer.chat_template
        if own:
            for probe in _PROBES:
                try:
                    theirs = tokenizer.apply_chat_template(probe, tokenize=False)
                except Exception:
                    continue  # e.g. a template without system prompts
                ours = tokenizer.apply_chat_template(probe, tokenize=False, chat_template=TEMPLATES[choice])
                if ours != theirs:
                    raise QtuneError(
                        f"data.chat_template: '{choice}' renders differently from the tokenizer's saved "
                        f"chat_template: {theirs!r} vs {ours!r}",
                        "leave data.chat_template unset to use the tokenizer's own, pick the built-in that "
                        "matches the model, or give a Jinja string to change the format on purpose",
                    )
        tokenizer.chat_template = TEMPLATES[choice]
        return
    if "{%" not in choice and "{{" not in choice:
        raise QtuneError(
            f"data.chat_template: unknown template '{choice}'",
            f"use one of {', '.join(TEMPLATES)}, a Jinja template string, or null for the tokenizer's own",
        )
    try:
        tokenizer.apply_chat_template(_PROBES[1], tokenize=False, chat_template=choice)
    except Exception as exc:
        raise QtuneError(f"data.chat_template: the Jinja template fails to render: {_first_line(exc)}") from None
    tokenizer.chat_template = choice


def _conversational(schema: str, rows: list[dict]) -> bool:
    return schema == "messages" or (schema == "prompt_completion" and isinstance(rows[0]["prompt"], list))


def _needs_template(recipe: Recipe, tokenizer, schema: str, rows: list[dict]) -> None:
    if _conversational(schema, rows) and not tokenizer.chat_template:
        raise QtuneError(
            f"model.tokenizer: {recipe.model.tokenizer or recipe.model.name} has no chat template for the "
            f"{schema} rows",
            f"set data.chat_template to one of {', '.join(TEMPLATES)} (or a Jinja string), or use the text or "
            "plain prompt/completion format",
        )


def _render_rows(rows: Rows, tokenizer, on_bad_row: str) -> None:
    """Render every chat once (text only): a row the template refuses (e.g. role order) is an error naming
    it, or skipped and counted. Rows are filtered in place."""
    keep, labels, failed = [], [], 0
    first = None
    for i, row in enumerate(rows):
        conversation = row["messages"] if "messages" in row else row["prompt"] + row["completion"]
        try:
            tokenizer.apply_chat_template(conversation, tokenize=False)
        except Exception as exc:
            where = rows.where[i] if i < len(rows.where) else f"row {i + 1}"
            if on_bad_row == "error":
                raise QtuneError(
                    f"{where}: the chat template fails to render it: {_first_line(exc)}",
                    "fix the row, choose a template for these roles, or set data.on_bad_row: skip",
                ) from None
            failed += 1
            first = first or f"{where}: {_first_line(exc)}"
            continue
        keep.append(row)
        labels.append(rows.where[i] if i < len(rows.where) else "")
    if failed:
        rows[:] = keep
        rows.where = labels
        rows.notes.append(f"skipped {failed} row(s) the chat template refused; first: {first}")
        print(f"qtune: warning: skipped {failed} row(s) the chat template refused; first: {first}", file=sys.stderr)
        if not keep:
            raise QtuneError("data: the chat template refused every row", first)


# --------------------------------------------------------------------------- build + loss


def loss_settings(recipe: Recipe, tokenizer, fmt: str) -> dict:
    """The SFTConfig arguments the data decides: which tokens carry loss, and tokenizing processes."""
    use_chat_template(recipe, tokenizer)
    answers_only = recipe.data.train_on == "completions"
    settings = {"dataset_num_proc": recipe.data.num_proc} if recipe.data.num_proc else {}
    if fmt == "text":
        return {**settings, "completion_only_loss": False}
    if fmt == "messages" and _has_generation_markers(tokenizer.chat_template):
        return {**settings, "assistant_only_loss": answers_only}
    return {**settings, "completion_only_loss": answers_only}


def build(recipe: Recipe, tokenizer, fmt: str, rows: list[dict], args=None):
    """A DatasetDict (train, and eval when data.eval_split is set) in the columns TRL trains on.

    With train_on: completions, chats whose template lacks `{% generation %}` markers are split into
    prompt (all turns before the last answer) + completion (the last answer), so TRL's completion-only
    loss applies (earlier answers are context only); with the markers (the built-in templates), TRL's
    assistant-only loss covers every assistant turn.

    The rows are written once (`save_to_disk`) under `<HF_DATASETS_CACHE>/qtune/<hash of the rows, the eval
    split and the seed>` and read back memory-mapped, so TRL's own `.map` steps (template, tokenization,
    masks) cache their results next to them and a second run on the same data, tokenizer and template is
    served from those files. With `args` (the run's SFTConfig) the main process writes first while the
    others wait, as TRL does for its own maps. `datasets.disable_caching()` keeps everything in memory.
    """
    import datasets

    use_chat_template(recipe, tokenizer)
    _needs_template(recipe, tokenizer, fmt, rows)
    eval_rows = getattr(rows, "eval_rows", None)
    split_last = (
        fmt == "messages"
        and recipe.data.train_on == "completions"
        and not _has_generation_markers(tokenizer.chat_template)
    )

    def shape(batch: list[dict]) -> list[dict]:
        return [_split_last_answer(row["messages"]) for row in batch] if split_last else list(batch)

    train_rows = shape(rows)
    eval_shaped = shape(eval_rows) if eval_rows else None
    if not eval_shaped and isinstance(recipe.data.eval_split, float) and len(train_rows) < 2:
        raise QtuneError(f"data.eval_split: {len(train_rows)} row(s) cannot be split", "add rows or drop eval_split")
    if not datasets.is_caching_enabled():
        return _in_memory(recipe, train_rows, eval_shaped)
    where = _cache_dir(recipe, train_rows, eval_shaped)
    first = args.main_process_first(local=False, desc="qtune data cache") if args is not None else nullcontext()
    with first:
        if not (where / "dataset_dict.json").is_file():
            _write_cache(_in_memory(recipe, train_rows, eval_shaped), where)
        return datasets.load_from_disk(str(where))


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
            f"data: cannot write the prepared rows to the datasets cache {where.parent}: {_first_line(exc)}",
            "free disk space there, or point HF_DATASETS_CACHE at a writable folder",
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone after the rename; left by an error or Ctrl-C otherwise
        if not bars_were_off:
            datasets.enable_progress_bars()


def _split_last_answer(messages: list[dict]) -> dict:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


# --------------------------------------------------------------------------- prepare + check (TRL's preparation)


def _carrier_model(tokenizer):
    """A one-layer model with the tokenizer's vocabulary: SFTTrainer needs a model to prepare data, and the
    preparation does not depend on which (so `qtune data` and the checks never load the real weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device("cpu"):
        return LlamaForCausalLM(config)


@dataclass
class Prepared:
    """Tokenized examples exactly as TRL prepares them (before truncation and packing) + the collator."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    collator: object
    eval_size: int = 0
    stats: dict = field(default_factory=dict)
    cache_files: list[str] = field(default_factory=list)  # the datasets cache files TRL's preparation read or wrote


def prepare(recipe: Recipe, tokenizer, dataset, args) -> Prepared:
    """Run TRL's own dataset preparation (chat template, tokenization, loss masks) on the train split, with
    the training's SFTConfig minus truncation and packing, so truncation losses can be measured."""
    import dataclasses
    import logging
    import tempfile

    import datasets
    from trl import SFTTrainer

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        view = dataclasses.replace(
            args,
            output_dir=tmp,
            max_length=None,
            packing=False,
            padding_free=False,
            report_to="none",
            eval_strategy="no",
            dataset_num_proc=args.dataset_num_proc,
        )
        quiet = logging.getLogger("trl")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            trainer = SFTTrainer(
                model=_carrier_model(tokenizer),
                args=view,
                train_dataset=dataset["train"],
                processing_class=tokenizer,
            )
        except Exception as exc:
            raise QtuneError(
                f"data: TRL could not prepare the rows: {_first_line(exc)}",
                "run `qtune data RECIPE` to see the rows; check data.chat_template and data.train_on",
            ) from None
        finally:
            quiet.setLevel(level)
        prepared = trainer.train_dataset
        out = Prepared(prepared["input_ids"], prepared["labels"], trainer.data_collator)
        out.cache_files = [f["filename"] for f in prepared.cache_files]
    out.eval_size = len(dataset["eval"]) if "eval" in dataset else 0
    out.stats = stats(recipe, out, end_of_turn_id(tokenizer, _schema_of_dataset(dataset["train"])))
    return out


def _schema_of_dataset(ds) -> str:
    plain = "text" in ds.column_names or ("prompt" in ds.column_names and isinstance(ds[0]["prompt"], str))
    return "text" if plain else "messages"


def end_of_turn_id(tokenizer, schema: str) -> int | None:
    """The token that ends an answer: what the chat template writes right after an assistant message's text,
    or eos for text and plain prompt/completion rows (TRL appends it)."""
    if schema == "text" or not tokenizer.chat_template:
        return tokenizer.eos_token_id
    marker = "qtunemarker"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:
        return tokenizer.eos_token_id
    after = rendered.split(marker, 1)[-1].strip(" ")
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    for i in ids:
        if i in tokenizer.all_special_ids:
            return i
    return ids[0] if ids else tokenizer.eos_token_id


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = {p: ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] for p in (50, 90, 99)}
    return {"min": ordered[0], "p50": pick[50], "p90": pick[90], "p99": pick[99], "max": ordered[-1]}


def stats(recipe: Recipe, prepared: Prepared, eot: int | None) -> dict:
    """Lengths, truncation and masking, as TRL's truncation (keep_start) and packing will see them."""
    limit = recipe.data.max_length
    lengths, truncated, answer_lost, dropped, untrained = [], 0, 0, 0, 0
    trained_tokens = total_tokens = 0
    eot_trained = 0
    for ids, labels in zip(prepared.input_ids, prepared.labels, strict=True):
        lengths.append(len(ids))
        kept = labels[:limit]
        trained = sum(1 for x in labels if x != -100)
        trained_kept = sum(1 for x in kept if x != -100)
        if len(ids) > limit:
            truncated += 1
            answer_lost += trained - trained_kept
        if trained and not trained_kept and not recipe.data.packing:
            dropped += 1
        if not trained_kept:
            untrained += 1
        if eot is not None and any(x == eot for x in kept):
            eot_trained += 1
        trained_tokens += trained_kept
        total_tokens += min(len(ids), limit)
    n = len(lengths)
    return {
        "examples": n,
        "eval_examples": prepared.eval_size,
        "length": _percentiles(lengths),
        "max_length": limit,
        "truncated": truncated,
        "answer_tokens_lost": answer_lost,
        "dropped": dropped,
        "untrained": untrained,
        "trained_tokens": trained_tokens,
        "tokens": total_tokens,
        "end_of_turn": eot,
        "end_of_turn_trained": eot_trained,
    }


def check(
    recipe: Recipe, tokenizer, fmt: str, rows: list[dict], args, sample: int | None = CHECK_SAMPLE, loud: bool = True
) -> Prepared:
    """Before any model loads: render every chat, prepare (a sample of) the rows through TRL exactly as
    training will, and fail loudly on the silent killers. Returns the preparation (for `qtune data`)."""
    from datasets import DatasetDict

    use_chat_template(recipe, tokenizer)
    _needs_template(recipe, tokenizer, fmt, rows)
    if isinstance(rows, Rows) and _conversational(fmt, rows):
        _render_rows(rows, tokenizer, recipe.data.on_bad_row)
    built = build(recipe, tokenizer, fmt, rows, args)  # the cache entry training reuses
    train_rows = built["train"]
    if sample is not None and len(train_rows) > sample:
        train_rows = train_rows.select(range(sample))
    prepared = prepare(
        recipe, tokenizer, DatasetDict(train=train_rows, **{k: v for k, v in built.items() if k == "eval"}), args
    )
    if loud:
        verify(recipe, tokenizer, prepared)
    return prepared


def verify(recipe: Recipe, tokenizer, prepared: Prepared) -> None:
    """Fail on the silent killers: end-of-turn never trained (pad == eos masking it included), and too many
    examples with no trained token (truncation, a template that marks nothing)."""
    s = prepared.stats
    answered = s["examples"] - s["untrained"]
    eot = s["end_of_turn"]
    if answered and s["end_of_turn_trained"] == 0:
        name = tokenizer.convert_ids_to_tokens(eot) if eot is not None else "eos"
        pad_is_eos = tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
        raise QtuneError(
            f"data: the end-of-turn token {name!r} carries no loss in any example"
            + (" (pad == eos, and eos is masked with the padding)" if pad_is_eos else "")
            + ": the model would never learn to stop",
            "use a chat template whose {% generation %} block includes the end-of-turn token (the built-ins "
            "do), or give the tokenizer a pad token distinct from eos",
        )
    if s["examples"] and s["untrained"] / s["examples"] > recipe.data.max_untrained_share:
        raise QtuneError(
            f"data: {s['untrained']} of {s['examples']} examples ({100 * s['untrained'] / s['examples']:.1f}%) have "
            f"no trained token after truncation to data.max_length {recipe.data.max_length}"
            + (f" ({s['answer_tokens_lost']} answer tokens lost to truncation)" if s["answer_tokens_lost"] else ""),
            "raise data.max_length, shorten the prompts, check data.train_on / the chat template, or raise "
            "data.max_untrained_share",
        )


# --------------------------------------------------------------------------- showing it


def render_example(tokenizer, input_ids: list[int], labels: list[int], dim: bool = False) -> str:
    """One example's tokens, masked ones (no loss) in [brackets] (or dimmed on a terminal)."""
    out, masked_run = [], []

    def flush():
        if masked_run:
            text = tokenizer.decode(masked_run)
            out.append(f"\x1b[2m{text}\x1b[0m" if dim else f"[{text}]")
            masked_run.clear()

    trained_run: list[int] = []
    for token, label in zip(input_ids, labels, strict=True):
        if label == -100:
            if trained_run:
                out.append(tokenizer.decode(trained_run))
                trained_run.clear()
            masked_run.append(token)
        else:
            flush()
            trained_run.append(token)
    flush()
    if trained_run:
        out.append(tokenizer.decode(trained_run))
    return "".join(out)


def summary(
    recipe: Recipe, tokenizer, fmt: str, rows: Rows, prepared: Prepared, settings: dict, samples: int, dim: bool
) -> str:
    s = prepared.stats
    lines = ["sources:"] + [f"  {line}" for line in describe_sources(rows)] if isinstance(rows, Rows) else []
    loss = (
        "every token"
        if recipe.data.train_on == "all"
        else "assistant turns (TRL assistant_only_loss, {% generation %} markers)"
        if settings.get("assistant_only_loss")
        else "the last answer only (template has no {% generation %} markers; earlier answers are context)"
        if fmt == "messages"
        else "completions (TRL completion_only_loss)"
        if fmt == "prompt_completion"
        else "every token"
    )
    length = s["length"]
    eot = s["end_of_turn"]
    lines += [
        f"schema: {fmt}; loss on {loss}",
        f"examples: {s['examples']} train" + (f", {s['eval_examples']} eval" if s["eval_examples"] else ""),
        f"tokens per example: min {length.get('min')}, p50 {length.get('p50')}, p90 {length.get('p90')}, "
        f"p99 {length.get('p99')}, max {length.get('max')} (max_length {s['max_length']})",
        f"truncated: {s['truncated']} examples, {s['answer_tokens_lost']} answer tokens lost; "
        f"dropped (no answer left): {s['dropped']}",
        f"trained tokens: {s['trained_tokens']} of {s['tokens']} "
        f"({100 * s['trained_tokens'] / max(1, s['tokens']):.1f}%); examples with none: {s['untrained']}",
        f"end of turn {tokenizer.convert_ids_to_tokens(eot) if eot is not None else None!r} trained in "
        f"{s['end_of_turn_trained']} of {s['examples']} examples; pad {tokenizer.pad_token!r}, eos "
        f"{tokenizer.eos_token!r}",
        f"packing: {'on (TRL bfd, padding-free position ids)' if recipe.data.packing else 'off'}",
    ]
    if prepared.cache_files:
        lines.append(f"cache: {Path(prepared.cache_files[0]).parent.parent} (reused by the next run on the same data)")
    for i in range(min(samples, s["examples"])):
        limit = recipe.data.max_length
        lines += [
            f"--- sample {i + 1} ([masked: no loss]) ---",
            render_example(tokenizer, prepared.input_ids[i][:limit], prepared.labels[i][:limit], dim=dim),
        ]
    return "\n".join(lines)
