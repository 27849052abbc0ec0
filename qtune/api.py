"""The Python API (`import qtune`): what a notebook needs, on the code paths the CLI runs.

    recipe = qtune.load_recipe("recipes/llama2-qlora.yaml", {"training.max_steps": 100})
    run = qtune.train(recipe)                     # the checks and outputs of `qtune train` (pipeline.train_recipe)
    merged = qtune.merge(run)                     # `qtune merge` (merging.merge)
    qtune.generate(run, "Hello")                  # `qtune chat --prompt` (chat.load_for_chat + chat.generate)

Each function is a thin call into the module the CLI command calls; problems raise the CLI's QtuneError (its
`.hint` says what to do), never SystemExit. `qtune/__init__.py` loads this module on first use, so `import qtune`
stays light; this module imports no torch either (each function imports what it runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qtune.config import Recipe, load_recipe
from qtune.errors import QtuneError
from qtune.rundir import RunDir

__all__ = ["QtuneError", "Recipe", "RunDir", "evaluate", "generate", "load_recipe", "merge", "open_run", "train"]

Overrides = list[str] | dict[str, Any] | None


def _with_flags(overrides: Overrides, resume: bool, overwrite: bool) -> Overrides:
    """`resume=True` / `overwrite=True` as the overrides `--resume` / `--overwrite` become on the command line."""
    flags = {"training.resume": True} if resume else {}
    if overwrite:
        flags["training.overwrite"] = True
    if not flags:
        return overrides
    if overrides is None:
        return flags
    if isinstance(overrides, dict):
        for key, value in flags.items():
            if key in overrides and overrides[key] != value:
                flag = key.split(".")[1]
                raise QtuneError(f"{flag}=True contradicts the override {key}={overrides[key]!r}", "give it once")
        return {**overrides, **flags}
    return [*overrides, *(f"{key}=true" for key in flags)]


def train(
    recipe: str | os.PathLike | dict | Recipe,
    overrides: Overrides = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    check: bool = False,
    quiet: bool = False,
    allow_pickle: bool = False,
) -> RunDir | None:
    """Train a recipe (a YAML path, a dict of sections or a Recipe, with overrides) as `qtune train` does: every
    check before the model loads, then TRL's trainer; the run directory gets the same files. Returns the run
    (`run.adapter`, `run.summary()`, `run.read_metrics()`, `run.path`); with `check=True`, only the checks (None).

    resume / overwrite: `--resume` / `--overwrite` (an existing, non-empty output_dir is refused without one)."""
    from qtune.cli import quiet_libraries
    from qtune.pipeline import train_recipe

    quiet_libraries()
    checked = load_recipe(recipe, _with_flags(overrides, resume, overwrite))
    name = str(recipe) if isinstance(recipe, str | os.PathLike) else None
    return train_recipe(checked, check=check, quiet=quiet, allow_pickle=allow_pickle, name=name)


def open_run(run: str | os.PathLike | RunDir) -> RunDir:
    """A finished run directory read back (its recipe.yaml and adapter checked), as merge and chat read it."""
    return RunDir.open(_run_path(run))


def merge(
    run: str | os.PathLike | RunDir,
    *,
    out: str | os.PathLike | None = None,
    dtype: str = "fp32",
    onto: str = "dequantized",
    base: str | None = None,
    quantize: int | None = None,
    prompts: list[str] | tuple[str, ...] = (),
    max_shard_size: str = "5GB",
    allow_pickle: bool = False,
) -> Path:
    """Merge the run's adapter into its base, verify the logits and save, as `qtune merge` does (same options);
    returns the merged model's folder (RUN_DIR/merged unless `out`), with its report in qtune_merge.json."""
    from qtune.cli import quiet_libraries
    from qtune.merging import merge as merge_run

    quiet_libraries()
    path = _run_path(run)
    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    merge_run(
        path,
        out=out,
        dtype=dtype,
        onto=onto,
        base=base,
        quantize_bits=quantize,
        prompts=prompts,
        max_shard_size=max_shard_size,
        allow_pickle=allow_pickle,
    )
    return Path(out) if out is not None else RunDir(path).merged


def evaluate(
    run: str | os.PathLike | RunDir,
    data: str | os.PathLike | None = None,
    *,
    base: bool = False,
    n: int = 20,
    max_new_tokens: int = 256,
    quiet: bool = True,
) -> dict:
    """Evaluate the run as `qtune eval` does (same figures, same RUN_DIR/eval/ written): on its eval split, or on
    `data` (a file, folder or Hub dataset id); `base=True` adds the base's figures (the adapter disabled). Returns
    what eval.json holds, plus the answers under "generations"."""
    from qtune.cli import quiet_libraries
    from qtune.evaluation import evaluate_run

    quiet_libraries()
    data = None if data is None else str(data)
    return evaluate_run(_run_path(run), data=data, base=base, n=n, max_new_tokens=max_new_tokens, quiet=quiet)


def generate(
    target: str | os.PathLike | RunDir,
    prompt: str | list,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    merged: bool = False,
    allow_pickle: bool = False,
) -> str | list[str]:
    """The assistant's answer, as `qtune chat --prompt` gives it: the run's adapter on its base as trained (or its
    merged/ with merged=True, or any model folder), the chat template, greedy at temperature 0.

    prompt: a text, or a conversation ([{"role": "user", "content": …}, …]); a list of texts or of conversations
    gives a list of answers (the model loads once). system: a system message put first in each conversation."""
    from qtune import chat
    from qtune.cli import quiet_libraries

    chats, single = _conversations(prompt, system)  # before anything loads
    chat.check_settings(max_new_tokens, temperature, top_p)
    quiet_libraries()
    from transformers import set_seed

    model, tokenizer, _ = chat.load_for_chat(str(_run_path(target)), merged, allow_pickle)
    set_seed(seed)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    answers = [chat.generate(model, tokenizer, messages, **settings) for messages in chats]
    return answers[0] if single else answers


def _run_path(run: Any) -> Path:
    if isinstance(run, RunDir):
        return run.path
    if isinstance(run, str | os.PathLike):
        return Path(run)
    raise QtuneError(
        f"a run is a run directory's path or a RunDir (what qtune.train returns), not {type(run).__name__}",
        "e.g. qtune.merge('runs/my-run') or qtune.merge(run)",
    )


def _conversations(prompt: Any, system: str | None) -> tuple[list[list[dict]], bool]:
    """(the conversations, whether one was given) from a text, a conversation, or a list of either."""
    shape = "a text, a conversation [{'role': 'user', 'content': '…'}, …], or a list of texts or conversations"
    if isinstance(prompt, str):
        chats, single = [[{"role": "user", "content": prompt}]], True
    elif isinstance(prompt, list | tuple) and prompt and all(isinstance(m, dict) for m in prompt):
        chats, single = [list(prompt)], True
    elif isinstance(prompt, list | tuple) and prompt and all(isinstance(p, str | list | tuple) for p in prompt):
        chats = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompt]
        single = False
    else:
        raise QtuneError(f"prompt: give {shape}", f"got {type(prompt).__name__}{' (empty)' if not prompt else ''}")
    for i, messages in enumerate(chats):
        where = "prompt" if single else f"prompt[{i}]"
        if not messages:
            raise QtuneError(f"{where}: an empty conversation", "give at least one user message")
        for j, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
                raise QtuneError(f"{where}[{j}]: a message is a dict with role and content", f"give {shape}")
        if system is not None:
            if messages[0]["role"] == "system":
                raise QtuneError(f"{where} starts with a system message and system= is given", "give it once")
            messages.insert(0, {"role": "system", "content": system})
    return chats, single
