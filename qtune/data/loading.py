"""`load_rows`: every source read and every row checked and mapped (before any model loads), then mixed per
samples/weight, deduplicated on request and shuffled by training.seed."""

from __future__ import annotations

import json
import random

from qtune.config import ONLINE_METHODS, DatasetSource, Recipe
from qtune.data.formats import (
    FORMAT_FIELDS,
    FORMAT_SCHEMA,
    ROLES,
    SHAREGPT_ROLES,
    BadRow,
    Rows,
    detect_format,
    map_row,
    rename_columns,
    unpair,
    with_system_prompt,
)
from qtune.data.sources import read_source, skipped_text
from qtune.errors import QtuneError


def skip_reason(exc: Exception) -> str:
    """A bad row's reason as counted among the skipped ones: the message without its row-specific indices, or
    only its head ("wrong role order: messages[3] …" → "wrong role order")."""
    import re

    text = str(exc)
    head, colon, _ = text.partition(":")
    if colon and re.fullmatch(r"[\w.\[\]' ]{1,40}", head):
        text = head
    return re.sub(r"\[\d+\]", "", text).strip()


def _read_split(source: DatasetSource, split: str, recipe: Recipe, index: int) -> tuple[str, list, list, dict]:
    """(schema, rows, where-labels, report) for one source and split: read, map, check every row."""
    on_bad_row = recipe.data.on_bad_row
    ds, numbers, skipped, where = read_source(source, split, on_bad_row)
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
    fmt = detect_format(columns, rename_columns(raw[0], source.columns), where) if detected else source.format
    if recipe.method in ONLINE_METHODS and fmt == "messages" and detected:
        fmt = "prompt"  # grpo / rloo: chats ending with the user turn the model answers
    if not detected and fmt == "messages" and "messages" not in columns and "conversations" not in columns:
        raise QtuneError(f"{where}: format messages needs a 'messages' column; columns: {sorted(columns)}")
    if not detected and fmt == "prompt" and "prompt" not in columns and "messages" not in columns:
        raise QtuneError(
            f"{where}: format prompt needs a 'prompt' or 'messages' column; columns: {sorted(columns)}",
            "map it with the source's columns: {prompt: column}",
        )
    if not detected and fmt not in ("messages", "prompt"):
        needed = [
            c for c in FORMAT_FIELDS[fmt] if c not in ("input", "system") and (fmt, c) != ("preference", "prompt")
        ]
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
    section = getattr(recipe, recipe.method) if recipe.method in ONLINE_METHODS else None
    system = section.system_prompt if section is not None and FORMAT_SCHEMA[fmt] == "prompt_only" else None
    for number, row in zip(numbers, raw, strict=True):
        try:
            mapped = map_row(rename_columns(row, source.columns), fmt, roles)
            if system:
                mapped["prompt"] = with_system_prompt(mapped["prompt"], system)
            rows.append(mapped)
        except BadRow as exc:
            if on_bad_row == "error":
                raise QtuneError(
                    f"{where}: row {number}: {exc} (format {fmt})",
                    "fix or remove the row, or set data.on_bad_row: skip to drop bad rows (counted)",
                ) from None
            skipped[skip_reason(exc)] += 1
            first_skip = first_skip or f"row {number}: {exc}"
            continue
        labels.append(f"{where}: row {number}")
    used = set(FORMAT_FIELDS[fmt]) | ({"conversations"} if fmt == "messages" else set())
    ignored = [c for c in columns if c not in used] if fmt != "prompt" else []  # prompt: the rest go to rewards
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
        raise QtuneError(f"{where}: every row was skipped ({skipped_text(skipped)})", first_skip)
    return FORMAT_SCHEMA[fmt], rows, labels, report


def _schema_of(schema: str, rows: list[dict]) -> str:
    """prompt_completion splits into text pairs and conversational pairs, which TRL cannot mix."""
    if schema in ("prompt_completion", "preference", "unpaired", "prompt_only") and isinstance(rows[0]["prompt"], list):
        return f"{schema} (conversational)"
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


def rows_for_kto(recipe: Recipe, fmt: str, rows: Rows) -> tuple[str, Rows]:
    """KTO's rows: unpaired rows as they are; preference pairs unpaired (chosen: label true, rejected: false, what
    TRL's KTO would do itself, but TRL unpairs in blocks of all-chosen then all-rejected rows and KTO reads its data in
    order, so qtune unpairs and shuffles by training.seed: every micro-batch mixes both labels). Refused when the
    training rows carry one label only: KTO needs desirable and undesirable examples."""
    if fmt == "preference":
        train, where = unpair(list(rows), rows.where)
        order = list(range(len(train)))
        random.Random(recipe.training.seed).shuffle(order)
        eval_rows = unpair(rows.eval_rows, [])[0] if rows.eval_rows else rows.eval_rows
        unpaired = Rows([train[i] for i in order], schema="unpaired", eval_rows=eval_rows)
        unpaired.where, unpaired.sources, unpaired.notes = [where[i] for i in order], rows.sources, rows.notes
        return "unpaired", unpaired
    labels = {row["label"] for row in rows}
    if len(labels) == 1:
        (label,) = labels
        files = ", ".join(dict.fromkeys(str(r["source"]) for r in rows.sources)) or "the data"
        kind, other = (
            ("true (desirable)", "false (undesirable)") if label else ("false (undesirable)", "true (desirable)")
        )
        raise QtuneError(
            f"data.datasets: every one of the {len(rows)} rows of {files} has label {kind}: KTO learns from both "
            "desirable and undesirable completions, and one label alone gives it nothing to contrast",
            f"add rows labelled {other}, or train on preference pairs (prompt + chosen + rejected)",
        )
    return fmt, rows
