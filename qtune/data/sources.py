"""Reading the recipe's sources: local .jsonl/.json/.csv/.parquet/.txt files, `save_to_disk` folders, folders of
files and Hub datasets, with line-level problems (bad bytes, broken JSON lines, ragged CSV rows) found per row."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

from qtune.config import DatasetSource
from qtune.errors import QtuneError, first_line

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


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
            raise QtuneError(f"{where}: no usable rows ({skipped_text(skipped)} skipped)")
        keys = list(dict.fromkeys(k for row in rows for k in row))  # from_list would keep the first row's keys only
        return datasets.Dataset.from_list([{k: row.get(k) for k in keys} for row in rows]), numbers, skipped
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parse errors in several types
        bad = _json_syntax_error(path.read_text(encoding="utf-8")) if suffix == ".json" else None
        if bad:
            raise QtuneError(f"{where}: line {bad[0]}: invalid JSON ({bad[1]})") from None
        raise QtuneError(f"{where}: cannot read rows: {first_line(exc)}") from None
    if numbers is None or len(numbers) != len(ds):
        numbers = list(range(1, len(ds) + 1))
    return ds, numbers, skipped


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


def read_source(source: DatasetSource, split: str, on_bad_row: str):
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
                raise QtuneError(f"{where}: cannot read the save_to_disk folder: {first_line(exc)}") from None
            ds = _pick_split(ds, source, split, where)
            return ds, list(range(1, len(ds) + 1)), Counter(), where
        looks_local = path.is_absolute() or source.path.startswith(".") or path.suffix.lower() in LOCAL_SUFFIXES
        if not path.exists() and looks_local:
            raise QtuneError(
                f"{where}: file not found",
                "give a .jsonl, .json, .csv, .parquet or .txt file, a folder, or a Hub dataset name "
                "(paths are relative to where you run qtune)",
            )
        if path.is_dir():
            check_one_format(path, where)
        try:
            ds = datasets.load_dataset(source.path, source.name, split=split, revision=source.revision)
        except Exception as exc:
            kind = "folder" if path.is_dir() else "Hub dataset"
            raise QtuneError(
                f"{where}: cannot load the {kind}: {first_line(exc)}",
                "check name/split/revision; Hub datasets need network access or a filled HF cache",
            ) from None
        return ds, list(range(1, len(ds) + 1)), Counter(), where
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()


def check_one_format(folder: Path, where: str) -> None:
    """A folder of data files is read whole: `datasets` reads only the files of its most common format and would
    leave the others out silently, so a folder that mixes formats (or holds files of no data format) is refused,
    naming the files that would be left out."""
    files = [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)]
    data = [
        p for p in files if p.suffix.lower() in LOCAL_SUFFIXES or p.name.lower().endswith((".jsonl.gz", ".json.gz"))
    ]
    kinds: dict[str, list[Path]] = {}
    for p in data:
        kinds.setdefault(LOCAL_SUFFIXES.get(p.suffix.lower(), "json"), []).append(p)
    if len(kinds) <= 1:
        return
    main = max(kinds, key=lambda k: len(kinds[k]))
    left = sorted(str(p.relative_to(folder)) for k, ps in kinds.items() if k != main for p in ps)
    raise QtuneError(
        f"{where}: the folder mixes data formats ({', '.join(sorted(kinds))}); these files would be left out: "
        + ", ".join(left[:5])
        + (f" … ({len(left)} files)" if len(left) > 5 else ""),
        "keep one format per folder, or list the files as separate data.datasets entries",
    )


def skipped_text(counts: Counter | dict) -> str:
    """Skip reasons with their counts, most frequent first: "3 invalid JSON, 1 not UTF-8"."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
