"""Shared fixtures: tiny random models saved locally (no hub), data files, and a recipe writer."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

# Offline, always: nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# qtune caches prepared data under the datasets cache: keep the tests' entries out of the user's cache.
# pytest-xdist workers inherit the controller's environment: each gets its own (no two processes write one).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(
        prefix=f"qtune-tests-datasets-{os.environ['PYTEST_XDIST_WORKER']}-"
    )
else:
    os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="qtune-tests-datasets-"))
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads per process
# measured 263 s against 9 s for the same 400-step run (subprocesses inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "1")

WORDS = "zero one two three four five six seven eight nine".split()


def spell_rows(n: int, digits: int = 4, seed: int = 0, fmt: str = "messages") -> list[dict]:
    """The demo task: spell a digit string as words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        number = " ".join(str(rng.randint(0, 9)) for _ in range(digits))
        answer = " ".join(WORDS[int(d)] for d in number.split())
        prompt = f"spell {number}"
        if fmt == "messages":
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        elif fmt == "prompt_completion":
            rows.append({"prompt": prompt + " :", "completion": " " + answer})
        else:
            rows.append({"text": f"{prompt} : {answer}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from qtune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    from qtune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2")


@pytest.fixture
def chat_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", spell_rows(64))


@pytest.fixture
def make_recipe(tmp_path, tiny_llama, chat_data):
    """Write a small, fast recipe (dict overrides merged section by section) and return its path."""

    def make(name: str = "recipe.yaml", **sections) -> Path:
        recipe = {
            "model": {"name": str(tiny_llama)},
            "quantization": {"bits": 4},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"datasets": [{"path": str(chat_data)}], "max_length": 64},
            "training": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "logging_steps": 2},
            "output_dir": str(tmp_path / "run"),
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(recipe.get(key), dict):
                recipe[key] = {**recipe[key], **value}
            else:
                recipe[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return path

    return make


def run_qtune(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run the real CLI in a subprocess (python -m qtune …) and return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "qtune", *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def trained_spans(tokenizer, ids: list[int], trained: list) -> list[str]:
    """The decoded runs of tokens that carry loss (`trained`: a truthy entry per token), in order."""
    spans, run = [], []
    for token, bit in zip(ids, trained, strict=True):
        if bit:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def start_qtune(*args: str) -> subprocess.Popen:
    """Start the real CLI in the background (python -m qtune …), output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "qtune", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until PATH exists; fails with the process's stderr if it ends first."""
    import time

    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"run ended (rc {proc.returncode}) before {path} appeared:\n{err[-3000:]}")
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def kill_after_checkpoint(recipe: Path, out: Path, checkpoint: int = 2) -> None:
    """`qtune train RECIPE output_dir=OUT` in a subprocess, SIGKILLed once checkpoint-N is complete: the kill leaves
    no adapter behind."""
    proc = start_qtune("train", recipe, f"output_dir={out}", "--quiet")
    wait_for(out / "checkpoints" / f"checkpoint-{checkpoint}" / "trainer_state.json", proc)
    assert proc.poll() is None, "the run should still be training when it is killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (out / "adapter").exists()


def resume(recipe: Path, out: Path):
    """`qtune train RECIPE output_dir=OUT --resume` (in-process), asserted to finish from a checkpoint."""
    resumed = run_qtune_in_process("train", recipe, f"output_dir={out}", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming checkpoint-" in resumed.stdout
    return resumed


def adapter_difference(reference: Path, other: Path, label: str) -> tuple[dict, float]:
    """The adapter weights of run OTHER (same names as REFERENCE's, all fp32) and their largest absolute difference
    from REFERENCE's, printed under LABEL."""
    import torch
    from safetensors.torch import load_file

    ref = load_file(reference / "adapter" / "adapter_model.safetensors")
    res = load_file(other / "adapter" / "adapter_model.safetensors")
    assert ref.keys() == res.keys() and all(v.dtype == torch.float32 for v in res.values())
    max_diff = max((ref[k] - res[k]).abs().max().item() for k in ref)
    print(f"{label}: max abs adapter difference {max_diff:.3g} over {len(ref)} tensors")
    return res, max_diff


def run_qtune_in_process(*args: str, cwd: Path | None = None, env: dict | None = None):
    """The CLI called in this process (qtune.cli.main), returned like run_qtune's CompletedProcess.

    For bad inputs whose exit path is not what is tested: a subprocess pays seconds of interpreter start-up and
    library imports per case. Exit codes come from SystemExit; any other exception propagates (a test fails
    with the traceback a user would have seen). `env` is set for the call only. Keep the cases that depend on
    the process itself (import-time environment, the launcher) on run_qtune."""
    import contextlib
    import io

    from qtune.cli import main

    out, err = io.StringIO(), io.StringIO()
    env = {k: str(v) for k, v in (env or {}).items()}
    saved = {k: os.environ.get(k) for k in env}
    here = os.getcwd()
    try:
        os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(here)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(["qtune", *map(str, args)], code, out.getvalue(), err.getvalue())


# Under pytest-xdist (scripts/test.sh runs `-n 2 --dist loadgroup`) every worker builds its own session and
# module fixtures: the tests that share an expensive one (a training run, GPTQ quantization) are kept on one
# worker, so that it is built once. Fixture → xdist group.
SHARED_BUILDS = {
    "trained": "export-run",
    "tiny_gptq": "gptq-checkpoints",
    "finished_run": "reliability-run",
    "stop_run": "stop-tokens-run",
    "dpo_run": "dpo-downstream-run",
    "digit_task": "grpo-digit-task",
    "grpo_run": "grpo-downstream-run",
    "api_run": "api-run",
    "eval_sft_run": "eval-sft-run",
    "eval_dpo_run": "eval-dpo-run",
    "harness_run": "harness-run",
    "corpus": "real-templates",  # built once on disk (tests/corpus.py): two workers must not build it at once
}


@pytest.hookimpl(wrapper=True)  # runs around every other plugin's hook, xdist's included
def pytest_collection_modifyitems(config, items):
    """Tests sharing an expensive fixture go to one xdist worker (marked before xdist's own hook reads the groups);
    `gpu` tests need CUDA: skipped (not failed) on the CPU-only CI machine. Afterwards, under `--dist loadgroup`,
    each grouped test's node id must carry its group (xdist's side channel to its scheduler): pytest 9.2 with
    pytest-xdist 3.8 drops it silently (pytest-dev/pytest-xdist#1386) and every shared trained run got built on both
    workers, so that fails loudly here."""
    for item in items:
        for fixture, group in SHARED_BUILDS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))

    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    result = yield
    if getattr(config.option, "loadgroup", False) and hasattr(config, "workerinput"):
        lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if lost:
            message = (
                f"pytest-xdist's --dist loadgroup lost the groups of {len(lost)} tests (e.g. {lost[0]}): this pytest "
                "and pytest-xdist do not work together (pytest-dev/pytest-xdist#1386); pyproject's dev extra pins "
                "pytest < 9.2"
            )
            print(f"\nerror: {message}", file=sys.__stderr__, flush=True)  # a worker's exception reaches no one
            pytest.exit(message, returncode=pytest.ExitCode.USAGE_ERROR)
    return result
