"""Bad recipes and overrides, table-driven: each ends in one `error:` line, exit code 2, no traceback.

Every row is a recipe (text or raw bytes) plus overrides, and the fragments its one error line must hold.
All rows run in-process through `qtune.cli.main(["train", "--check", …])` (fast: they fail before anything
heavy), a few of them again through a real subprocess; none may create or change anything in output_dir.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import BaseModel

from conftest import run_qtune
from qtune.cli import main
from qtune.config import Recipe, load_recipe
from qtune.errors import QtuneError

# A valid, fast recipe; a row edits one line (line numbers stay put) or appends lines after line 18.
GOOD = """\
model:
  name: @MODEL@
quantization:
  bits: 4
lora:
  r: 8
  alpha: 16
  dropout: 0.0
data:
  datasets:
    - path: @DATA@
  max_length: 64
training:
  max_steps: 4
  micro_batch_size: 4
  grad_accum: 1
  lr: 1e-3
output_dir: @OUT@
"""
LONG = "9" * 400  # a 400-digit number
HUGE = "x" * 10_000  # a 10 kB string

# A "billion laughs" recipe: 10 levels of 10 aliases (10^10 strings once expanded) in about 700 bytes.
LAUGHS = (
    "training:\n  extra:\n    l0: &l0 ["
    + ", ".join(["lol"] * 10)
    + "]\n"
    + "".join(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 10))
)


def edit(old: str, new: str) -> str:
    """GOOD with one line changed."""
    assert GOOD.count(old) == 1, old
    return GOOD.replace(old, new)


@dataclass
class Row:
    id: str
    recipe: str | bytes  # @MODEL@, @DATA@, @DATA_DIR@, @OUT@ are filled in
    message: list[str]  # all in the error line; @RECIPE@ is the recipe's path
    hint: list[str] = field(default_factory=list)  # all in the hint line
    overrides: list[str] = field(default_factory=list)


ROWS = [
    # ---------------------------------------------------------------- the file itself
    Row("binary", b"\x00\x01\x02\x03model:\x00", ["@RECIPE@: is a binary file", "NUL byte at offset 0"]),
    Row(
        "latin-1",
        GOOD.replace("  lr: 1e-3", "  # caf\xe9").encode("latin-1"),
        ["@RECIPE@:17: not UTF-8 text", "byte 0xe9 at offset"],
        ["UTF-8"],
    ),
    Row("utf-16", GOOD.encode("utf-16"), ["@RECIPE@: is UTF-16 text"], ["save it as UTF-8"]),
    Row("empty", "", ["@RECIPE@: the recipe is empty"], ["model.name", "data.datasets"]),
    Row("only-comments", "# a recipe\n\n# to be written\n", ["@RECIPE@: the recipe is empty"]),
    Row("a-list", "- model\n- data\n", ["@RECIPE@: a recipe is a mapping of sections", "not list"]),
    Row("a-string", "model.name=x\n", ["@RECIPE@: a recipe is a mapping of sections", "not str"]),
    Row(
        "two-documents",
        GOOD + "---\nlora:\n  r: 4\n",
        ["@RECIPE@:19: a second YAML document starts here"],
        ["remove this `---`"],
    ),
    Row(
        "control-char", edit("  lr: 1e-3", "  lr: 1e-3\x07"), ["@RECIPE@:17: invalid YAML", "control character 0x0007"]
    ),
    Row(
        "python-tag",
        edit("  r: 8", "  r: !!python/object/apply:os.system [echo hi]"),
        ["@RECIPE@:6: invalid YAML", "python/object/apply:os.system"],
        ["no YAML tags"],
    ),
    Row("deep-nesting", GOOD + "x: " + "[" * 300 + "]" * 300 + "\n", ["@RECIPE@:19: nested more than 100 levels"]),
    Row("5000-digit-int", edit("  r: 8", "  r: " + "9" * 5000), ["@RECIPE@:6: a number of 5000 characters"]),
    # ---------------------------------------------------------------- duplicate keys, aliases
    Row(
        "duplicate-key",
        edit("  alpha: 16", "  r: 16"),
        ["@RECIPE@:7: duplicate key 'lora.r' (first on line 6)"],
        ["keep only the last one"],
    ),
    Row(
        "duplicate-section",
        GOOD + "training:\n  lr: 1e-4\n",
        ["@RECIPE@:19: duplicate key 'training' (first on line 13)"],
    ),
    Row(
        "duplicate-in-extra",
        edit("  lr: 1e-3", "  extra: {seed: 1, seed: 2}"),
        ["@RECIPE@:17: duplicate key 'training.extra.seed'"],
    ),
    Row(
        "duplicate-in-list-item",
        edit("    - path: @DATA@", "    - {path: @DATA@, format: messages, format: text}"),
        ["@RECIPE@:11: duplicate key 'data.datasets.0.format'"],
    ),
    Row(
        "alias",
        "defaults: &d {r: 8}\n" + edit("lora:", "lora: *d").replace("  r: 8\n  alpha: 16\n  dropout: 0.0\n", ""),
        ["@RECIPE@:6: YAML alias *d", "refuse anchors and aliases"],
        ["write the values out"],
    ),
    Row(
        "merge-key",
        "base: &b {r: 8}\n" + edit("  r: 8", "  <<: *b"),
        ["@RECIPE@:7: YAML alias *b"],
    ),
    Row("billion-laughs", GOOD.replace("training:\n", LAUGHS), ["@RECIPE@:16: YAML alias *l0"]),
    # ---------------------------------------------------------------- non-finite numbers
    Row("lr-inf", edit("  lr: 1e-3", "  lr: .inf"), ["@RECIPE@:17: training.lr: Input should be a finite number"]),
    Row("lr-nan", edit("  lr: 1e-3", "  lr: .nan"), ["training.lr: Input should be a finite number", "got nan"]),
    Row("lr-1e999", edit("  lr: 1e-3", "  lr: 1e999"), ["training.lr: Input should be a finite number", "1e999"]),
    Row("alpha-inf", edit("  alpha: 16", "  alpha: .inf"), ["@RECIPE@:7: lora.alpha: Input should be a finite"]),
    Row("dropout-nan", edit("  dropout: 0.0", "  dropout: .nan"), ["lora.dropout: Input should be a finite"]),
    Row("epochs-inf", edit("  max_steps: 4", "  epochs: .inf"), ["training.epochs: Input should be a finite"]),
    Row(
        "weight-inf",
        edit("    - path: @DATA@", "    - {path: @DATA@, weight: .inf}"),
        ["data.datasets.0.weight: Input should be a finite number"],
        ["valid: 0 < data.datasets.0.weight ≤ 1000"],
    ),
    Row("warmup-nan", edit("  lr: 1e-3", "  warmup_ratio: .nan"), ["warmup_ratio"]),
    Row(
        "grad-norm-inf", edit("  lr: 1e-3", "  max_grad_norm: .inf"), ["training.max_grad_norm: Input should be a fin"]
    ),
    Row("decay-1e999", edit("  lr: 1e-3", "  weight_decay: 1.0e999"), ["training.weight_decay: Input should be a fin"]),
    Row("untrained-nan", edit("  max_length: 64", "  max_untrained_share: .nan"), ["data.max_untrained_share"]),
    Row("eval-split-inf", edit("  max_length: 64", "  eval_split: .inf"), ["data.eval_split: a fraction must be"]),
    # ---------------------------------------------------------------- absurd ranges (the hint states the range)
    Row(
        "lr-zero",
        edit("  lr: 1e-3", "  lr: 0"),
        ["training.lr: Input should be greater than 0"],
        ["0 < training.lr, a finite number"],
    ),
    Row("lr-negative", edit("  lr: 1e-3", "  lr: -2e-4"), ["training.lr: Input should be greater than 0", "-2e-4"]),
    Row("dropout-one", edit("  dropout: 0.0", "  dropout: 1"), ["lora.dropout"], ["0 ≤ lora.dropout < 1"]),
    Row("dropout-negative", edit("  dropout: 0.0", "  dropout: -0.1"), ["lora.dropout: Input should be greater"]),
    Row("warmup-1.5", edit("  lr: 1e-3", "  warmup_ratio: 1.5"), ["warmup_ratio"], ["0 ≤ training.warmup_ratio ≤ 1"]),
    Row("warmup-negative", edit("  lr: 1e-3", "  warmup_ratio: -0.1"), ["training.warmup_ratio: Input should be"]),
    Row("epochs-zero", edit("  max_steps: 4", "  epochs: 0"), ["training.epochs: Input should be greater than 0"]),
    Row("epochs-huge", edit("  max_steps: 4", "  epochs: 1e6"), ["training.epochs"], ["0 < training.epochs ≤ 10000"]),
    Row("r-zero", edit("  r: 8", "  r: 0"), ["@RECIPE@:6: lora.r: Input should be greater than 0"], ["0 < lora.r"]),
    Row("r-negative", edit("  r: 8", "  r: -8"), ["lora.r: Input should be greater than 0"]),
    Row("alpha-zero", edit("  alpha: 16", "  alpha: 0"), ["lora.alpha: Input should be greater than 0"]),
    Row("batch-zero", edit("  micro_batch_size: 4", "  micro_batch_size: 0"), ["training.micro_batch_size"]),
    Row("accum-zero", edit("  grad_accum: 1", "  grad_accum: 0"), ["training.grad_accum: Input should be greater"]),
    Row("max-length-zero", edit("  max_length: 64", "  max_length: 0"), ["data.max_length: Input should be greater"]),
    Row(
        "max-length-over-positions",  # the tiny model has 512 positions; checked where its config is read
        edit("  max_length: 64", "  max_length: 4096"),
        ["data.max_length: 4096 is more than the 512 positions of"],
        ["at most 512"],
    ),
    Row("samples-zero", edit("    - path: @DATA@", "    - {path: @DATA@, samples: 0}"), ["data.datasets.0.samples"]),
    Row(
        "samples-huge",
        edit("    - path: @DATA@", "    - {path: @DATA@, samples: 1000000000000}"),
        ["data.datasets.0.samples: Input should be less than or equal to 100000000"],
        ["0 < data.datasets.0.samples ≤ 100000000, a whole number"],
    ),
    Row("weight-zero", edit("    - path: @DATA@", "    - {path: @DATA@, weight: 0}"), ["data.datasets.0.weight"]),
    Row("weight-negative", edit("    - path: @DATA@", "    - {path: @DATA@, weight: -1}"), ["datasets.0.weight"]),
    Row("weight-huge", edit("    - path: @DATA@", "    - {path: @DATA@, weight: 1e9}"), ["less than or equal to 1000"]),
    Row("eval-split-1.5", edit("  max_length: 64", "  eval_split: 1.5"), ["data.eval_split: a fraction must be"]),
    Row("eval-split-zero", edit("  max_length: 64", "  eval_split: 0"), ["data.eval_split: a fraction must be"]),
    Row("untrained-two", edit("  max_length: 64", "  max_untrained_share: 2"), ["data.max_untrained_share"]),
    Row("grad-norm-zero", edit("  lr: 1e-3", "  max_grad_norm: 0"), ["training.max_grad_norm: Input should be gr"]),
    Row("decay-negative", edit("  lr: 1e-3", "  weight_decay: -0.1"), ["training.weight_decay: Input should be gr"]),
    Row("seed-negative", edit("  lr: 1e-3", "  seed: -1"), ["training.seed"], ["0 ≤ training.seed ≤ 4294967295"]),
    Row("seed-2**32", edit("  lr: 1e-3", "  seed: 4294967296"), ["training.seed: Input should be less than"]),
    Row("num-proc-zero", edit("  max_length: 64", "  num_proc: 0"), ["data.num_proc: Input should be greater"]),
    Row("steps-400-digits", edit("  max_steps: 4", f"  max_steps: {LONG}"), ["training.max_steps", "… (400 chars)"]),
    # ---------------------------------------------------------------- huge values are abbreviated
    Row("r-400-digits", edit("  r: 8", f"  r: {LONG}"), ["lora.r: Input should be less than", "9999… (400 chars)"]),
    Row("r-10kB-string", edit("  r: 8", f"  r: {HUGE}"), ["lora.r: Input should be a valid integer", "(10000 chars)"]),
    Row("unknown-10kB-key", edit("  r: 8", f"  ? {HUGE}\n  : 8"), ["unknown key 'lora.xxxx", "(10005 chars)"]),
    # ---------------------------------------------------------------- paths
    Row("output-dir-in-data", edit("    - path: @DATA@", "    - path: @DATA_DIR@"), ["output_dir", "inside the data"]),
    Row("output-dir-empty", edit("output_dir: @OUT@", "output_dir: ''"), ["@RECIPE@:18: output_dir: must not be"]),
    Row("model-name-blank", edit("  name: @MODEL@", "  name: '  '"), ["@RECIPE@:2: model.name: must not be empty"]),
    Row("tilde-no-such-user", edit("  name: @MODEL@", "  name: ~qtune-no-such-user/m"), ["cannot expand ~qtune-no"]),
    # ---------------------------------------------------------------- overrides: the same checks
    Row("override-lr-inf", GOOD, ["override 'training.lr=inf'", "finite number"], overrides=["training.lr=inf"]),
    Row("override-lr-1e999", GOOD, ["override 'training.lr=1e999'", "finite"], overrides=["training.lr=1e999"]),
    Row("override-dropout-nan", GOOD, ["lora.dropout", "finite"], overrides=["lora.dropout=.nan"]),
    Row("override-weight", GOOD, ["data.datasets.0.weight"], ["≤ 1000"], overrides=["data.datasets.0.weight=-1"]),
    Row("override-r-400", GOOD, ["(400 chars)", "lora.r: Input should be less"], overrides=[f"lora.r={LONG}"]),
    Row("override-10kB-key", GOOD, ["override 'lora.xxx", "… (10007 chars)"], overrides=[f"lora.{HUGE}=8"]),
    Row(
        "override-dup",
        GOOD,
        ["override 'training.extra={a: 1, a: 2}'", "duplicate key 'a'"],
        overrides=["training.extra={a: 1, a: 2}"],
    ),
    Row("override-alias", GOOD, ["YAML alias *x"], overrides=["training.extra={a: &x [1], b: *x}"]),
    Row(
        "override-contradicts-flag",
        GOOD,
        ["override 'training.overwrite=true' contradicts 'training.overwrite=false'"],
        overrides=["training.overwrite=false", "--overwrite"],
    ),
    Row("override-huge-index", GOOD, ["does not exist"], overrides=[f"data.datasets.{'9' * 5000}.path=x"]),
    Row(
        "override-output-in-data",
        GOOD,
        ["override 'output_dir=", "inside the data"],
        overrides=["data.datasets.0.path=@DATA_DIR@", "output_dir=@DATA_DIR@/run"],
    ),
    Row(
        "override-tilde-user",
        GOOD,
        ["cannot expand ~qtune-no-such-user"],
        overrides=["model.tokenizer=~qtune-no-such-user"],
    ),
]


@pytest.fixture
def place(tmp_path, tiny_llama, chat_data):
    """The paths a row's @TOKENS@ stand for; output_dir sits inside the data folder (harmless unless used)."""
    return {
        "@MODEL@": str(tiny_llama),
        "@DATA@": str(chat_data),
        "@DATA_DIR@": str(chat_data.parent),
        "@OUT@": str(tmp_path / "run"),
    }


def fill(text: str, place: dict) -> str:
    for token, value in place.items():
        text = text.replace(token, value)
    return text


def write_row(row: Row, place: dict, tmp_path: Path) -> tuple[Path, list[str]]:
    path = tmp_path / "recipe.yaml"
    if isinstance(row.recipe, bytes):
        path.write_bytes(row.recipe)
    else:
        path.write_text(fill(row.recipe, place), encoding="utf-8")
    return path, [fill(o, place) for o in row.overrides]


def the_error(code: int, err: str) -> tuple[str, str]:
    """The failure contract: exit 2, one `error:` line (+ at most one hint line), no traceback."""
    assert code == 2, f"exit code {code}\n{err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, f"want exactly one error: line, got:\n{err}"
    rest = lines[starts[0] + 1 :]
    assert rest == [] or (len(rest) == 1 and rest[0].startswith("  hint: ")), err
    assert len(lines[starts[0]]) < 400, f"error line not abbreviated: {len(lines[starts[0]])} chars"
    return lines[starts[0]], rest[0] if rest else ""


def run_in_process(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--check", *map(str, args)])
    return exc.value.code, capsys.readouterr().err


def check(row: Row, path: Path, message: str, hint: str) -> None:
    for fragment in row.message:
        fragment = fragment.replace("@RECIPE@", str(path))
        assert fragment in message, f"{fragment!r} not in {message!r}"
    for fragment in row.hint:
        assert fragment in hint, f"{fragment!r} not in hint {hint!r}"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_in_process(row, place, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, overrides = write_row(row, place, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())

    code, err = run_in_process(capsys, path, *overrides)

    check(row, path, *the_error(code, err))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run dir, no `~` folder, nothing


SUBPROCESS = ["binary", "duplicate-key", "lr-1e999", "override-lr-inf", "r-10kB-string", "output-dir-in-data"]


@pytest.mark.parametrize("row", [r for r in ROWS if r.id in SUBPROCESS], ids=lambda r: r.id)
def test_bad_input_real_cli(row, place, tmp_path):
    path, overrides = write_row(row, place, tmp_path)
    result = run_qtune("train", "--check", path, *overrides, cwd=tmp_path, timeout=300)
    check(row, path, *the_error(result.returncode, result.stdout + result.stderr))


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("row_id", ["duplicate-key", "lr-inf", "override-weight", "max-length-over-positions"])
def test_refusal_leaves_an_earlier_run_byte_identical(row_id, place, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    for name, content in {
        "adapter/adapter_model.safetensors": b"earlier weights",
        "recipe.yaml": b"# the earlier run's recipe\n",
        "summary.json": b'{"steps": 4}\n',
    }.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(content)
    before = snapshot(run)
    row = next(r for r in ROWS if r.id == row_id)
    path, overrides = write_row(row, place, tmp_path)

    code, err = run_in_process(capsys, path, *overrides, "--overwrite")

    check(row, path, *the_error(code, err))
    assert snapshot(run) == before


# --------------------------------------------------------------------------- one row per schema field


def _numeric_fields(cls: type[BaseModel] = Recipe, prefix: tuple = ()) -> list[tuple[tuple, type]]:
    """(key path, float or int) of every numeric recipe key; list sections at index 0."""
    found = []
    for name, info in cls.model_fields.items():
        args = [info.annotation, *typing.get_args(info.annotation)]
        for arg in args:
            inner = typing.get_args(arg)[0] if typing.get_origin(arg) is list else arg
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                found += _numeric_fields(inner, (*prefix, name, 0) if inner is not arg else (*prefix, name))
                break
        else:
            kinds = [a for a in args if a in (int, float)]
            if kinds:
                found.append(((*prefix, name), kinds[0]))
    return found


NUMERIC = _numeric_fields()
FLOATS = [path for path, kind in NUMERIC if kind is float]
INTS = [path for path, kind in NUMERIC if kind is int]


def test_the_field_lists_are_complete():
    dotted = {".".join(map(str, p)) for p in FLOATS}
    assert dotted >= {
        "lora.alpha",
        "lora.dropout",
        "data.datasets.0.weight",
        "data.eval_split",
        "data.max_untrained_share",
        "training.epochs",
        "training.lr",
        "training.warmup_ratio",
        "training.weight_decay",
        "training.max_grad_norm",
    }
    assert {".".join(map(str, p)) for p in INTS} >= {"lora.r", "data.max_length", "training.seed", "training.max_steps"}


@pytest.fixture
def plain_recipe(tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: some/model\ndata:\n  datasets:\n    - path: train.jsonl\n", encoding="utf-8")
    return path


def _required_beside(key: tuple) -> list[str]:
    """Overrides a key's section needs to be valid apart from the key under test (grpo / rloo: a reward)."""
    return [f"{key[0]}.rewards=[{{name: accuracy}}]"] if key[0] in ("grpo", "rloo") else []


@pytest.mark.parametrize("value", ["inf", "-inf", ".inf", "nan", ".NaN", "1e999", "-1.0e999"])
@pytest.mark.parametrize("key", FLOATS, ids=lambda p: ".".join(map(str, p)))
def test_every_float_key_refuses_non_finite(key, value, plain_recipe):
    dotted = ".".join(map(str, key))
    with pytest.raises(QtuneError) as err:
        load_recipe(plain_recipe, [*_required_beside(key), f"{dotted}={value}"])
    message = err.value.message
    assert message.startswith(f"override '{dotted}={value}'") and f"{dotted}:" in message, message
    assert "finite" in message or "fraction" in message, message


@pytest.mark.parametrize("key", INTS, ids=lambda p: ".".join(map(str, p)))
def test_every_int_key_has_a_range_and_abbreviates(key, plain_recipe):
    dotted = ".".join(map(str, key))
    with pytest.raises(QtuneError) as err:
        load_recipe(plain_recipe, [*_required_beside(key), f"{dotted}={LONG}"])
    assert f"{dotted}: Input should be less than or equal to" in err.value.message
    assert "… (400 chars)" in err.value.message and len(err.value.message) < 300
    assert err.value.hint.startswith("valid: ") and dotted in err.value.hint


# --------------------------------------------------------------------------- what is accepted


def test_billion_laughs_is_refused_within_bounded_memory_and_time(place, tmp_path):
    # The real CLI under a 1 GiB address-space cap: expanding the aliases would need far more, and take minutes.
    path = tmp_path / "laughs.yaml"
    path.write_text(fill(GOOD.replace("training:\n", LAUGHS), place), encoding="utf-8")
    assert path.stat().st_size < 1500

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))

    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "qtune", "train", "--check", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=cap,
    )
    assert time.monotonic() - start < 30
    message, _ = the_error(result.returncode, result.stdout + result.stderr)
    assert f"{path}:16: YAML alias *l0" in message


def test_tilde_is_expanded_once_for_every_path(tmp_path, tiny_llama, chat_data, capsys, monkeypatch):
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "models").mkdir()
    (home / "models" / "tiny").symlink_to(tiny_llama)
    (home / "data" / "train.jsonl").write_bytes(chat_data.read_bytes())
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    recipe = work / "r.yaml"
    text = edit("  name: @MODEL@", "  name: ~/models/tiny\n  tokenizer: ~/models/tiny").replace("@OUT@", "~/runs/x")
    recipe.write_text(text.replace("@DATA@", "~/data/train.jsonl"), encoding="utf-8")

    loaded = load_recipe(recipe)
    assert loaded.model.name == loaded.model.tokenizer == str(home / "models" / "tiny")
    assert loaded.data.datasets[0].path == str(home / "data" / "train.jsonl")
    assert loaded.output_dir == str(home / "runs" / "x")

    with pytest.raises(SystemExit) as exc:
        main(["train", "--check", str(recipe)])
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    assert f"output in {home / 'runs' / 'x'}" in out.out
    result = run_qtune("train", "--check", recipe, "output_dir=~/runs/y", cwd=work, env={"HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert f"output in {home / 'runs' / 'y'}" in result.stdout
    assert list(work.iterdir()) == [recipe]  # no folder literally named `~`


def test_accepted_spellings(tmp_path, plain_recipe):
    # A UTF-8 byte-order mark (Windows editors) is fine; 1e-1 (a string to YAML 1.1) is a fraction, not a split name.
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + plain_recipe.read_bytes() + b"  eval_split: 1e-1\n")
    recipe = load_recipe(bom)
    assert recipe.data.eval_split == pytest.approx(0.1)
    assert load_recipe(plain_recipe, ["data.eval_split=validation"]).data.eval_split == "validation"
    # an anchor that no alias uses is harmless; the same override twice is one override
    anchored = tmp_path / "anchored.yaml"
    anchored.write_text(plain_recipe.read_text() + "lora: &l\n  r: 4\n", encoding="utf-8")
    assert load_recipe(anchored, ["lora.r=8", "lora.r=8"]).lora.r == 8
    # output_dir beside the data folder (not inside it) is fine
    (tmp_path / "data").mkdir()
    assert load_recipe(plain_recipe, [f"data.datasets.0.path={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}"])
