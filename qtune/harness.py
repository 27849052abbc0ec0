"""`qtune eval RUN_DIR --tasks NAME[,NAME]`: lm-evaluation-harness benchmarks on a run's adapter (and, with
`base=True`, on its base alone), written to RUN_DIR/eval/harness/ (results.json, samples.jsonl).

lm-eval is an optional extra (`pip install 'qtune[harness]'`); everything here imports it lazily.

The model goes to lm-eval as an instance: qtune's `load_trained` (the base loaded exactly as the run trained it,
the adapter on it through peft's `PeftModel`) wrapped in lm-eval's `HFLM(pretrained=model, tokenizer=...)`. HFLM's
own `peft=` argument only works when HFLM loads the base itself from a name, and that load cannot be the run's:
it passes the checkpoint config's `quantization_config` to `from_pretrained` explicitly, so a `BitsAndBytesConfig`
given as a model argument fails ("got multiple values for keyword argument 'quantization_config'"), and
transformers 5 no longer reads the legacy `load_in_4bit=True` (it reaches the model's __init__: TypeError). It
would also skip what `load_base` does besides (the other quantization backends, the compute dtype, safetensors
only, bitsandbytes' CPU repack guard) and use the base's tokenizer rather than the one saved with the adapter.
`base=True` evaluates the same loaded model inside peft's `disable_adapter()`: one copy of the 4-bit base.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from pathlib import Path

from qtune.errors import QtuneError, first_line
from qtune.evaluation import library_versions

INSTALL = "pip install 'qtune[harness]'"
VERSIONS = ("qtune", "lm-eval", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")
# lm-eval's own note when it is given a model instance; said for every instance, it does not apply here (qtune
# placed and loaded the model; none of HFLM's loading arguments are passed).
_INSTANCE_NOTES = ("model kwarg is not of type `str`", "Passed an already-initialized model through `pretrained`")


def require_lm_eval():
    """The lm_eval package, or a QtuneError with the line that installs it."""
    try:
        import lm_eval
    except ImportError as exc:
        if exc.name == "lm_eval" or (exc.name or "").startswith("lm_eval."):
            raise QtuneError(
                "--tasks runs lm-evaluation-harness, which is not installed (the lm-eval package)", INSTALL
            ) from None
        raise QtuneError(f"lm-eval is installed but does not import: {first_line(exc)}", INSTALL) from None
    return lm_eval


def parse_task_names(text: str | list[str]) -> list[str]:
    """`NAME[,NAME]` (or a list of them) → the names, in order, each once."""
    parts = [text] if isinstance(text, str) else list(text)
    names = [n.strip() for part in parts for n in part.split(",")]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise QtuneError(
            "--tasks: no task name given", "e.g. --tasks hellaswag,arc_easy (`lm-eval ls tasks` lists them)"
        )
    return names


def run_tasks(
    run_dir: str | os.PathLike,
    tasks: str | list[str],
    limit: int | float | None = None,
    base: bool = False,
    quiet: bool = False,
    include_path: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = False,
    command: str | None = None,
    log=print,
) -> dict:
    """Run lm-eval's `simple_evaluate` on RUN_DIR's adapter (on its base loaded as trained) and, with base=True, on
    the base alone; write RUN_DIR/eval/harness/ (results.json: per-task metrics of each model, the command, the
    settings, the versions; samples.jsonl: lm-eval's per-example record) and return what results.json holds.

    Everything that can refuse (not a run dir, a reward model, lm-eval missing, an unknown task name, bad settings,
    the run dir in use) is checked before the model loads, and nothing in the run dir changes then."""
    from qtune.model import refuse_reward_run
    from qtune.rundir import RunDir

    names = parse_task_names(tasks)
    limit = _check_settings(limit, num_fewshot, batch_size)
    if include_path is not None:
        include_path = Path(include_path)
        if not include_path.is_dir():
            raise QtuneError(
                f"--include-path: {include_path} is not a directory",
                "give the folder holding your lm-eval task YAML files",
            )
    lm_eval = require_lm_eval()
    run = RunDir.open(run_dir)
    refuse_reward_run(run.recipe, run.path, "eval --tasks")
    run.check_unlocked()
    _quiet_lm_eval(quiet)
    manager = task_manager(names, include_path)
    started = time.time()
    with run.lock("eval --tasks"):
        model, tokenizer = _load(run)
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        settings = dict(tasks=names, limit=limit, num_fewshot=num_fewshot, apply_chat_template=apply_chat_template)
        if not quiet:
            log(f"qtune eval: lm-eval {lm_eval.__version__} tasks {', '.join(names)} on {run.adapter} (tuned)")
        tuned = _evaluate(lm, manager, **settings)
        figures = {"tuned": tuned}
        if base:
            if not quiet:
                log("qtune eval: the same tasks on the base alone (the adapter disabled)")
            with model.disable_adapter():
                figures["base"] = _evaluate(lm, manager, **settings)
        result = _result(run, names, figures, limit, num_fewshot, batch_size, apply_chat_template, include_path)
        result["command"] = command or f"run_tasks({str(run.path)!r}, {names!r})"
        result["wall_s"] = round(time.time() - started, 2)
        _write(run, result, figures)
    log(summary_text(result))
    return result


def _check_settings(limit, num_fewshot, batch_size) -> int | float | None:
    """The settings checked; returns the limit as lm-eval takes it (a count as an int, or a fraction below 1)."""
    if limit is not None and not (limit > 0 and (limit < 1 or float(limit).is_integer())):
        raise QtuneError(
            f"--limit: {limit:g} is neither a number of examples (1, 2, …) nor a fraction below 1",
            "e.g. --limit 100 (the first 100 examples of each task) or --limit 0.1 (10%)",
        )
    if num_fewshot is not None and num_fewshot < 0:
        raise QtuneError(f"--num-fewshot: {num_fewshot} is negative", "0 or more examples in each prompt")
    if batch_size < 1:
        raise QtuneError(f"--batch-size: {batch_size} is below 1", "e.g. --batch-size 8")
    return int(limit) if limit is not None and limit >= 1 else limit


def task_manager(names: list[str], include_path: Path | None = None):
    """lm-eval's TaskManager that knows every name, or a QtuneError listing close names for each it does not know.

    When every name is a task (or tag) defined under include_path, only that folder is indexed: lm-eval's index of
    its own ~15,000 task names reads every YAML file it ships (10 to 50 s on two CPU cores). Otherwise the full
    index (lm-eval's tasks, then include_path's, which win on a clash: lm-eval's order)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(names) <= set(local.all_subtasks) | set(local.all_tags):  # a group may name lm-eval's own tasks
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known and not (n.endswith((".yaml", ".yml")) and Path(n).is_file())]
    if unknown:
        said = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            said.append(f"'{name}'" + (f" (close: {', '.join(close)})" if close else ""))
        raise QtuneError(
            f"--tasks: lm-eval {'does' if len(unknown) == 1 else 'do'} not know {', '.join(said)}",
            "`lm-eval ls tasks` lists every task name"
            + ("" if include_path else "; your own task YAML files: --include-path DIR"),
        )
    return manager


def _drop_instance_note(record) -> bool:
    return not any(note in record.getMessage() for note in _INSTANCE_NOTES)


def _quiet_lm_eval(quiet: bool) -> None:
    """lm-eval logs through `lm_eval.*` loggers: its warnings are kept (errors only, and no progress bars of
    datasets and transformers, with quiet), the note it gives for every model instance is dropped (see the
    module's docstring)."""
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR if quiet else logging.WARNING)
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    if _drop_instance_note not in hf_logger.filters:
        hf_logger.addFilter(_drop_instance_note)
    if quiet:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _load(run):
    """The adapter on its base as trained (frozen, eval mode) and the tokenizer saved with the adapter."""
    from transformers import AutoTokenizer

    from qtune.model import load_trained

    model = load_trained(run.recipe, run.adapter)
    tokenizer = AutoTokenizer.from_pretrained(str(run.adapter))
    return model, tokenizer


def _evaluate(lm, manager, tasks, limit, num_fewshot, apply_chat_template) -> dict:
    """One simple_evaluate over every task, lm-eval's results as they come (per-task metrics and samples)."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template,
        log_samples=True,
    )
    if results is None:  # not the main process (lm-eval returns results on rank 0 only)
        raise QtuneError("lm-eval returned no results", "run `qtune eval --tasks` as one process, not under a launcher")
    return results


def _result(run, names, figures, limit, num_fewshot, batch_size, apply_chat_template, include_path) -> dict:
    """What results.json holds: per model (tuned, base), per task, lm-eval's metric values; the settings and the
    task definitions lm-eval used; the versions."""
    from qtune.quant import describe

    tuned = figures["tuned"]
    return {
        "run_dir": str(run.path),
        "base_model": run.recipe.model.name,
        "adapter": str(run.adapter),
        "quantization": describe(run.recipe),
        "tasks": names,
        "settings": {
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "apply_chat_template": apply_chat_template,
            "include_path": str(include_path) if include_path is not None else None,
        },
        "results": {side: _plain(found["results"]) for side, found in figures.items()},
        "groups": {side: _plain(found.get("groups", {})) for side, found in figures.items() if found.get("groups")},
        "n_samples": _plain(tuned.get("n-samples", {})),
        "n_shot": _plain(tuned.get("n-shot", {})),
        "higher_is_better": _plain(tuned.get("higher_is_better", {})),
        "task_versions": _plain(tuned.get("versions", {})),
        "task_configs": _plain(tuned.get("configs", {})),
        "versions": library_versions(VERSIONS),
    }


def _plain(value):
    """lm-eval's results as JSON values (its configs hold functions, its model info a torch dtype)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable))


def _write(run, result: dict, figures: dict) -> None:
    """RUN_DIR/eval/harness/ staged beside itself and renamed into place (the previous one stays whole until then);
    the rest of eval/ is left as it is. Called under the run's lock; recorded in the manifest, so an --overwrite of
    the run sets eval/ aside with the rest."""
    from qtune.rundir import staged_output

    target = run.path / "eval" / "harness"
    with staged_output(target) as stage:
        (stage / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        with open(stage / "samples.jsonl", "w", encoding="utf-8") as out:
            for side, found in figures.items():
                for task, samples in (found.get("samples") or {}).items():
                    for sample in samples:
                        record = {"model": side, "task": task, **_plain(sample)}
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    run.record_written("eval")


# --------------------------------------------------------------------------- the printed table


def metric_rows(result: dict) -> list[tuple[str, str, str, float | None, float | None]]:
    """(task, metric, filter, base, tuned) for every metric lm-eval reported, groups' aggregates first (stderr and
    aliases left out)."""
    rows = []
    tuned = {**result.get("groups", {}).get("tuned", {}), **result["results"]["tuned"]}
    base = {**result.get("groups", {}).get("base", {}), **result["results"].get("base", {})}
    for task, values in tuned.items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            rows.append((task, metric, filter_name, base.get(task, {}).get(key), value))
    return rows


def render_table(result: dict) -> str:
    """Per task and metric: the base (with --base), the tuned model and the difference."""
    with_base = "base" in result["results"]
    header = ["task", "metric", "filter", *(["base"] if with_base else []), "tuned", *(["Δ"] if with_base else [])]
    lines = []
    for task, metric, filter_name, base, tuned in metric_rows(result):
        arrow = {True: " ↑", False: " ↓"}.get(result.get("higher_is_better", {}).get(task, {}).get(metric), "")
        row = [task, metric + arrow, filter_name]
        if with_base:
            row.append(_number(base))
        row.append(_number(tuned))
        if with_base:
            row.append("—" if base is None else f"{tuned - base:+.4f}")
        lines.append(row)
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *lines]]
    return "\n".join(text)


def _number(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def summary_text(result: dict) -> str:
    samples = result.get("n_samples", {})
    counts = ", ".join(f"{t}: {s.get('effective', s.get('original'))}" for t, s in samples.items())
    return (
        f"{render_table(result)}\n"
        f"  examples per task: {counts}\n"
        f"  wrote {Path(result['run_dir']) / 'eval' / 'harness'}: results.json, samples.jsonl"
    )
