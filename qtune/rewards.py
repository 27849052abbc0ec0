"""Reward functions for method grpo / rloo (issue #17): the built-ins, the loader of user functions by reference,
and the guard that turns a misbehaving function into one QtuneError.

Every reward function has TRL's signature `f(prompts, completions, **columns) -> list[float]`: one value per
completion; `columns` holds the data's other columns (e.g. `answer`), one value per completion, plus what TRL adds
(`completion_ids`, `trainer_state`). A completion is text, or a list of messages (conversational data) whose last
`content` is the answer.

A recipe names each reward in `grpo.rewards` (or `rloo.rewards`):

    rewards:
      - {name: accuracy, column: answer, extract: last_number}   # a built-in, with its options
      - {name: format, pattern: "<think>.*</think><answer>.*</answer>", weight: 0.5}
      - {name: my_rewards.py:brevity}                              # a user function: file.py:name or pkg.mod:name

This module imports no torch: the recipe check resolves every reward (imports user code) before any model loads.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from qtune.errors import QtuneError, first_line

# --------------------------------------------------------------------------- helpers


def completion_text(completion) -> str:
    """A completion as text: the text itself, or the content of a conversational completion's messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    return str(completion)


NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def _number_text(text: str) -> str:
    """A number as compared: thousands commas dropped, trailing zeros of a decimal dropped (`1,000.50` → `1000.5`)."""
    text = text.replace(",", "").strip()
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def extract_last_number(text: str) -> str | None:
    """The last number in the text (`The answer is 42.` → `42`), or None."""
    found = NUMBER.findall(text)
    return _number_text(found[-1]) if found else None


def extract_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{…}` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth, begin = start + len("\\boxed{"), 1, start + len("\\boxed{")
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
        i += 1
    return None


def _normalise(value) -> str:
    text = " ".join(str(value).split())
    number = NUMBER.fullmatch(text)
    return _number_text(text) if number else text


# --------------------------------------------------------------------------- built-ins


def _extract(text: str, how: str, pattern: str | None) -> str | None:
    """The answer in `text` by `how`: last_number, boxed, regex (`pattern`'s first group, or the whole match, at
    its last match) or whole (the text, stripped); None when there is none."""
    if how == "last_number":
        return extract_last_number(text)
    if how == "boxed":
        return extract_boxed(text)
    if how == "regex":
        matches = list(re.finditer(pattern, text, re.DOTALL))
        return (matches[-1].group(1) if matches[-1].groups() else matches[-1].group(0)) if matches else None
    return text.strip()


def accuracy(
    prompts,
    completions,
    *,
    column: str = "answer",
    extract: str = "last_number",
    pattern: str | None = None,
    reference: str = "whole",
    reference_pattern: str | None = None,
    **columns,
) -> list[float]:
    r"""1.0 where the completion's extracted final answer equals the reference read from the row's `column`, else
    0.0.

    extract (from the completion): last_number (the last number; `1,000` = `1000`, `2.50` = `2.5`), boxed (the last
    `\boxed{…}`), regex (`pattern`'s first group, or the whole match, at its last match), or whole (the whole
    completion, stripped). reference (from the column): the same choices, regex with `reference_pattern`; whole by
    default (the column holds the bare answer); GSM8K's answer column (a worked solution ending `#### 72`) needs
    last_number or regex with `####\s*(.+)`. Values are compared with whitespace collapsed and numbers normalised;
    a row whose reference cannot be read scores 0.0."""
    if column not in columns:
        raise KeyError(f"no column '{column}' in the data (columns: {', '.join(sorted(_data_columns(columns)))})")
    answers = columns[column]
    out = []
    for completion, answer in zip(completions, answers, strict=True):
        got = _extract(completion_text(completion), extract, pattern)
        want = _extract(str(answer), reference, reference_pattern)
        out.append(1.0 if got is not None and want is not None and _normalise(got) == _normalise(want) else 0.0)
    return out


def format_match(prompts, completions, *, pattern: str, **columns) -> list[float]:
    """1.0 where the whole completion (surrounding whitespace ignored) matches the regex `pattern` (`.` matches
    newlines too), else 0.0; e.g. `<think>.*</think>\\s*<answer>.*</answer>`."""
    compiled = re.compile(pattern, re.DOTALL)
    return [1.0 if compiled.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]


def length(prompts, completions, *, target: int, unit: str = "tokens", completion_ids=None, **columns) -> list[float]:
    """1.0 at `target` length, falling linearly to 0.0 at twice the target or at zero length:
    max(0, 1 - |n - target| / target). n counts the completion's tokens (unit tokens, from TRL's completion_ids),
    words or characters. A reward for a length, and a penalty for straying from it."""
    out = []
    for i, completion in enumerate(completions):
        if unit == "tokens" and completion_ids is not None:
            n = len(completion_ids[i])
        elif unit == "chars":
            n = len(completion_text(completion))
        else:  # words (or tokens without completion_ids)
            n = len(completion_text(completion).split())
        out.append(max(0.0, 1.0 - abs(n - target) / target))
    return out


def _data_columns(columns: dict) -> list[str]:
    return [k for k in columns if k not in TRL_KWARGS]


# What TRL passes besides the data's columns.
TRL_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")

# name → (function, {option: (type, required, default, check → error text or None)})
BUILTINS: dict[str, tuple[Callable, dict]] = {
    "accuracy": (
        accuracy,
        {
            "column": (str, False, "answer", None),
            "extract": (
                str,
                False,
                "last_number",
                lambda v: (
                    None
                    if v in ("last_number", "boxed", "regex", "whole")
                    else "must be last_number, boxed, regex or whole"
                ),
            ),
            "pattern": (str, False, None, None),
            "reference": (
                str,
                False,
                "whole",
                lambda v: (
                    None
                    if v in ("last_number", "boxed", "regex", "whole")
                    else "must be whole, last_number, boxed or regex"
                ),
            ),
            "reference_pattern": (str, False, None, None),
        },
    ),
    "format": (format_match, {"pattern": (str, True, None, None)}),
    "length": (
        length,
        {
            "target": (int, True, None, lambda v: None if v > 0 else "must be a whole number > 0"),
            "unit": (
                str,
                False,
                "tokens",
                lambda v: None if v in ("tokens", "words", "chars") else "must be tokens, words or chars",
            ),  # fmt: skip
        },
    ),
}


def describe_builtins() -> str:
    return "; ".join(
        f"{name} ({', '.join(o + ('' if spec[1] else '?') for o, spec in opts.items())})"
        for name, (_, opts) in BUILTINS.items()
    )


# --------------------------------------------------------------------------- resolving a recipe's entry


def is_reference(name: str) -> bool:
    """`path/to/rewards.py:name` or `package.module:name` (a built-in's name has no colon)."""
    return ":" in name


def _check_builtin_options(name: str, options: dict) -> dict:
    _, spec = BUILTINS[name]
    unknown = [k for k in options if k not in spec]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(spec), n=1)
        raise ValueError(
            f"reward {name} has no option '{unknown[0]}'"
            + (f" (did you mean '{close[0]}'?)" if close else "")
            + f"; its options: {', '.join(spec) or 'none'}"
        )
    settings = {}
    for option, (kind, required, _default, check) in spec.items():
        if option not in options:
            if required:
                raise ValueError(f"reward {name} needs the option '{option}'")
            continue
        value = options[option]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"reward {name}: {option} must be a whole number, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ValueError(f"reward {name}: {option} must be text, got {value!r}")
        problem = check(value) if check else None
        if problem:
            raise ValueError(f"reward {name}: {option} {problem}, got {value!r}")
        settings[option] = value
    for key in ("pattern", "reference_pattern"):
        if key in settings:
            try:
                re.compile(settings[key])
            except re.error as exc:
                raise ValueError(f"reward {name}: {key} is not a valid regex ({exc})") from None
    if name == "accuracy":
        for mode, key, default in (("extract", "pattern", "last_number"), ("reference", "reference_pattern", "whole")):
            how = settings.get(mode, default)
            if how == "regex" and key not in settings:
                raise ValueError(f"reward accuracy: {mode} regex needs a {key} (its first group is the answer)")
            if how != "regex" and key in settings:
                raise ValueError(f"reward accuracy: {key} applies to {mode} regex only ({mode} is {how})")
    return settings


def _import_reference(reference: str) -> Callable:
    """The function a reference names; ValueError with the file, line and the import error's one line."""
    target, _, attr = reference.rpartition(":")
    if not target or not attr:
        raise ValueError(f"reward reference '{reference}' is not path/to/file.py:function or package.module:function")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"reward file {target} not found (paths are relative to the current directory)")
        module_name = f"qtune_user_rewards_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:  # noqa: BLE001 (user code: anything it raises is reported, one line)
            sys.modules.pop(module_name, None)
            raise ValueError(f"reward file {_where(exc, path)} does not import: {_one_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):
                raise ValueError(
                    f"reward module {target} not found (no module named {exc.name!r}); a file is given as "
                    "path/to/file.py:function"
                ) from None
            raise ValueError(f"reward module {target} does not import: {_one_line(exc)}") from None
        except BaseException as exc:  # noqa: BLE001
            raise ValueError(f"reward module {_where(exc, None) or target} does not import: {_one_line(exc)}") from None
    if not hasattr(module, attr):
        functions = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        close = difflib.get_close_matches(attr, functions, n=1)
        raise ValueError(
            f"reward {reference}: {target} has no function '{attr}'"
            + (f" (did you mean '{close[0]}'?)" if close else "")
            + (f"; its functions: {', '.join(functions)}" if functions else "")
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"reward {reference}: '{attr}' is a {type(fn).__name__}, not a function")
    _check_signature(reference, fn)
    return fn


def _where(exc: BaseException, path: Path | None) -> str:
    """file:line of the user code an import error came from (a SyntaxError knows its own)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    tb, found = exc.__traceback__, None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if (path is None or Path(filename).resolve() == path.resolve()) and "importlib" not in filename:
            found = f"{filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found or str(path or "")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def _check_signature(reference: str, fn: Callable) -> None:
    """TRL calls f(prompts=…, completions=…, completion_ids=…, trainer_state=…, **columns): keyword arguments, so the
    function must take prompts and completions by those names and the rest as **kwargs (it may name data columns,
    e.g. `answer`, which TRL passes by name)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: not inspectable; it will be called as TRL does
    params = signature.parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [n for n in ("prompts", "completions") if n not in params and not has_var_kw]
    problems = []
    if missing:
        problems.append(f"it takes no {' or '.join(missing)}")
    if not has_var_kw:
        problems.append("it has no **kwargs for the data columns TRL passes")
    if problems:
        raise ValueError(
            f"reward {reference} has the wrong signature {signature}: {'; '.join(problems)}; TRL's is "
            "f(prompts, completions, **kwargs) -> list[float]"
        )


def resolve(name: str, options: dict | None = None) -> Callable:
    """The reward function a recipe entry names, with its options bound; ValueError (one line) when it cannot be."""
    options = dict(options or {})
    if is_reference(name):
        if options:
            raise ValueError(
                f"reward {name} is a user function: options ({', '.join(options)}) are for built-ins only; read "
                "settings inside the function"
            )
        return _import_reference(name)
    if name not in BUILTINS:
        close = difflib.get_close_matches(name, list(BUILTINS), n=1)
        raise ValueError(
            f"'{name}' is not a built-in reward"
            + (f" (did you mean '{close[0]}'?)" if close else "")
            + f"; built-ins: {describe_builtins()}; or a function: path/to/file.py:name or package.module:name"
        )
    fn, _ = BUILTINS[name]
    settings = _check_builtin_options(name, options)

    def bound(prompts, completions, **kwargs):
        return fn(prompts, completions, **settings, **kwargs)

    bound.__name__ = name
    bound.__doc__ = fn.__doc__
    return bound


def reward_means(record: dict, prefix: str = "") -> dict[str, float]:
    """grpo / rloo: each reward function's mean in a log record (TRL's `rewards/<name>/mean`, eval ones prefixed
    eval_), by the function's name."""
    head = prefix + "rewards/"
    return {
        key[len(head) : -len("/mean")]: value
        for key, value in record.items()
        if key.startswith(head) and key.endswith("/mean") and isinstance(value, (int, float))
    }


# --------------------------------------------------------------------------- the guard


def guarded(name: str, fn: Callable, num_generations: int = 1) -> Callable:
    """`fn` as TRL calls it, stopping the run with one QtuneError (naming the reward, the step and the prompt index)
    when it raises, returns another number of values than completions, or returns None / NaN / ±inf / a non-number.
    The step is the optimizer step being computed (TRL's trainer_state.global_step + 1); the prompt index is the
    prompt's place in that step's batch (completion index // num_generations)."""

    def where(i: int, prompts, kwargs) -> str:
        state = kwargs.get("trainer_state")
        step = f"step {state.global_step + 1}" if state is not None else "step ?"
        shown = ""
        if prompts is not None and i < len(prompts):
            text = completion_text(prompts[i])
            shown = f" ({text[:60]!r}{'…' if len(text) > 60 else ''})"
        return f"{step}, prompt {i // num_generations}{shown}, completion {i}"

    def call(prompts, completions, **kwargs):
        try:
            values = fn(prompts, completions, **kwargs)
        except QtuneError:
            raise
        except Exception as exc:  # noqa: BLE001 (user code)
            i = _first_failing(fn, prompts, completions, kwargs)
            at = where(i, prompts, kwargs) if i is not None else where(0, None, kwargs).split(",")[0]
            raise QtuneError(
                f"reward {name} raised {_one_line(exc)} at {at}",
                "fix the reward function (it gets prompts, completions and the data's columns, one per completion)",
            ) from exc
        try:
            values = list(values)
        except TypeError:
            raise QtuneError(
                f"reward {name} returned {type(values).__name__}, not a list of numbers, at "
                f"{where(0, None, kwargs).split(',')[0]}",
                "return one float per completion",
            ) from None
        if len(values) != len(completions):
            raise QtuneError(
                f"reward {name} returned {len(values)} value(s) for {len(completions)} completions at "
                f"{where(0, None, kwargs).split(',')[0]}",
                "return exactly one float per completion (in the completions' order)",
            )
        for i, value in enumerate(values):
            bad = _bad_value(value)
            if bad:
                raise QtuneError(
                    f"reward {name} returned {bad} at {where(i, prompts, kwargs)}",
                    "return a finite float for every completion (0.0 where the reward does not apply)",
                )
        return [float(v) for v in values]

    call.__name__ = name
    call.__qualname__ = name
    return call


def _bad_value(value) -> str | None:
    """What is wrong with one returned reward (None, NaN, ±inf, not a number), or None when it is a finite number
    (int, float, or a numpy / torch scalar)."""
    if value is None:
        return "None"
    if isinstance(value, (bool, str, bytes)):
        return f"{type(value).__name__} {value!r}"[:80]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"a {type(value).__name__}, not a number"
    return None if math.isfinite(number) else repr(number)


def _first_failing(fn: Callable, prompts, completions, kwargs) -> int | None:
    """The first completion the function raises on alone (columns sliced to it), or None when none does alone."""
    n = len(completions)
    for i in range(n):
        one = {
            k: ([v[i]] if isinstance(v, list) and len(v) == n else v)
            for k, v in kwargs.items()
            if k not in ("log_extra", "log_metric")
        }
        try:
            fn([prompts[i]] if prompts is not None else None, [completions[i]], **one)
        except Exception:  # noqa: BLE001
            return i
    return None
