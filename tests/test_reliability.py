"""Never lose a run: one writer per run dir, --overwrite that keeps the previous run until the new one has an
adapter, kills at chosen instants, damaged checkpoints, a full disk, files qtune did not write, symbolic links.

Every case asserts the contract: a refusal changes nothing; a failure leaves the previous complete run or the
new complete run, and no litter a later command mistakes for output."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_qtune, run_qtune_in_process, start_qtune, wait_for
from qtune.rundir import LOCK, PREVIOUS, RunDir, checkpoint_problem, safetensors_problem

pytestmark = pytest.mark.slow


def _snapshot(folder: Path) -> dict:
    """Every file's bytes (the lock file's holder line aside: it says who wrote last, not what)."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != LOCK}


def _one_error(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama):
    """One finished 4-step run with checkpoints at steps 2 and 4; tests copy it."""
    from conftest import spell_rows, write_jsonl

    root = tmp_path_factory.mktemp("finished")
    data = write_jsonl(root / "train.jsonl", spell_rows(64))
    recipe = root / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {"name": str(tiny_llama)},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "data": {"datasets": [{"path": str(data)}], "max_length": 64},
                "training": {"max_steps": 4, "save_steps": 2, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3,
                             "logging_steps": 2},
                "output_dir": str(root / "run"),
            }
        )
    )  # fmt: skip
    result = run_qtune_in_process("train", recipe, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, root / "run"


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dest = tmp_path / name
    shutil.copytree(run, dest, symlinks=True)
    return dest


def test_second_train_is_refused_while_the_first_holds_the_run(make_recipe, tmp_path):
    recipe = make_recipe(training={"max_steps": 500, "logging_steps": 1})
    first = start_qtune("train", recipe, "--quiet")
    try:
        wait_for(tmp_path / "run" / "metrics.jsonl", first)
        for args in (("train", recipe, "--overwrite"), ("train", recipe, "--resume")):
            second = run_qtune(*args)
            line = _one_error(second)
            assert "is in use by qtune train (pid" in line and f"pid {first.pid} " in line, line
        assert first.poll() is None, "the first run must go on"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    # a dead holder's lock is free: the OS dropped the flock when the process ended
    assert RunDir(tmp_path / "run").check_unlocked() is None


def test_overwrite_that_fails_before_an_adapter_puts_the_previous_run_back(finished_run, tmp_path):
    recipe, finished = finished_run
    run = _copy(finished, tmp_path)
    (run / "notes.txt").write_text("mine")
    before = _snapshot(run)
    crashed = run_qtune(
        "train", recipe, f"output_dir={run}", "--overwrite", "training.lr=1e30", "training.max_grad_norm=1e30",
        "training.save_steps=null", "--quiet",
    )  # fmt: skip
    assert "is not a finite number" in _one_error(crashed)
    assert "previous run" in crashed.stderr and "put back" in crashed.stderr
    assert _snapshot(run) == before  # adapter, checkpoints, recipe, metrics, summary and notes.txt as they were
    assert not (run / PREVIOUS).exists()


def test_overwrite_killed_midway_is_rolled_back_by_the_next_command(finished_run, tmp_path):
    recipe, finished = finished_run
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    proc = start_qtune("train", recipe, f"output_dir={run}", "--overwrite", "training.max_steps=500",
                  "training.save_steps=null", "training.logging_steps=1", "--quiet")  # fmt: skip
    wait_for(run / PREVIOUS, proc)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert (run / PREVIOUS / "adapter").is_dir() and not (run / "adapter").exists()
    # any command that opens the run finishes the interrupted overwrite: here it is rolled back
    pushed = run_qtune("push", run, "--repo-id", "me/x", "--dry-run", tmp_path / "staged")
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert not (run / PREVIOUS).exists()
    assert _snapshot(run) == before


def test_overwrite_keeps_files_qtune_did_not_write_and_never_follows_a_link(finished_run, tmp_path):
    recipe, finished = finished_run
    run = _copy(finished, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.move(run / "checkpoints", outside)
    (run / "checkpoints").symlink_to(outside, target_is_directory=True)
    kept_outside = _snapshot(outside)
    (run / "notes.txt").write_text("mine")
    done = run_qtune_in_process(
        "train", recipe, f"output_dir={run}", "--overwrite", "training.save_steps=null", "--quiet"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "notes.txt").read_text() == "mine"
    assert _snapshot(outside) == kept_outside  # the link was moved aside and removed, not what it points to
    assert not (run / "checkpoints").is_symlink() and not list((run / "checkpoints").glob("checkpoint-*"))
    assert not (run / PREVIOUS).exists()
    assert json.loads((run / "summary.json").read_text())["steps"] == 4

    foreign = tmp_path / "not-a-run"
    foreign.mkdir()
    (foreign / "loss.png").write_bytes(b"my plot")
    refused = run_qtune_in_process("train", recipe, f"output_dir={foreign}", "--overwrite")
    assert "loss.png, which qtune did not write" in _one_error(refused)
    assert (foreign / "loss.png").read_bytes() == b"my plot" and sorted(os.listdir(foreign)) == ["loss.png"]
    assert "current directory" in _one_error(run_qtune_in_process("train", recipe, "output_dir=.", "--check"))
    assert "output_dir" in _one_error(run_qtune_in_process("train", recipe, "output_dir=", "--check"))


@pytest.mark.parametrize(
    "damage",
    ["truncated adapter safetensors", "invalid trainer_state.json", "truncated optimizer.pt"],
)
def test_damaged_latest_checkpoint_is_named_and_passed_over(finished_run, tmp_path, damage):
    recipe, finished = finished_run
    run = _copy(finished, tmp_path)
    latest = run / "checkpoints" / "checkpoint-4"
    target = {
        "truncated adapter safetensors": latest / "adapter_model.safetensors",
        "invalid trainer_state.json": latest / "trainer_state.json",
        "truncated optimizer.pt": latest / "optimizer.pt",
    }[damage]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage.startswith("truncated") else b"{not json")
    assert checkpoint_problem(latest) is not None and checkpoint_problem(run / "checkpoints" / "checkpoint-2") is None
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as metrics:
        metrics.write('{"step": 5, "lo')  # a kill while a log line was being written
    resumed = run_qtune_in_process("train", recipe, f"output_dir={run}", "--resume", "training.max_steps=6", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count(f"{latest} is damaged") == 1  # said once, not again by the check under the lock
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-2" and summary["steps"] == 6


def test_finished_run_resumed_changes_nothing_and_settings_that_change_the_base_are_refused(finished_run, tmp_path):
    recipe, finished = finished_run
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    done = run_qtune_in_process("train", recipe, f"output_dir={run}", "--resume")
    assert done.returncode == 0 and "the run is finished (4 of 4 steps" in done.stdout, done.stdout + done.stderr
    auto = run_qtune_in_process("train", recipe, f"output_dir={run}", "training.resume=auto")
    assert auto.returncode == 0 and "nothing was changed" in auto.stdout
    for override, named in (
        ("quantization.double_quant=false", "quantization.double_quant True -> False"),
        ("quantization.backend=quanto", "quantization.backend 'bnb' -> 'quanto'"),
        ("quantization.quant_type=fp4", "quantization.quant_type 'nf4' -> 'fp4'"),
    ):
        refused = run_qtune_in_process(
            "train", recipe, f"output_dir={run}", "--resume", "training.max_steps=6", override
        )
        assert named in _one_error(refused)
    assert _snapshot(run) == before


def test_disk_full_during_the_final_save_keeps_the_previous_run(finished_run, tmp_path, monkeypatch, capsys):
    """A patched writer: peft's safetensors write of the adapter fails with ENOSPC halfway (in-process run)."""
    import peft.peft_model

    from qtune import cli

    recipe, finished = finished_run
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    real = peft.peft_model.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "adapter.tmp" in str(filename):
            Path(filename).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(recipe), f"output_dir={run}", "--overwrite", "training.save_steps=null", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: out of disk space while writing" in err and "Traceback" not in err
    assert not (run / "adapter.tmp").exists() and not (run / PREVIOUS).exists()
    assert _snapshot(run) == before


def test_a_kill_between_the_two_renames_of_an_adapter_save_is_repaired(finished_run, tmp_path):
    """The instant after adapter/ was renamed aside and before the new one took its place."""
    _, finished = finished_run
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    os.rename(run / "adapter", run / "adapter.old")
    (run / "adapter.tmp").mkdir()  # a half-written staging folder
    (run / "adapter.tmp" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    opened = RunDir.open(run)
    assert opened.recipe is not None and _snapshot(run) == before
    assert not (run / "adapter.old").exists() and not (run / "adapter.tmp").exists()


def test_safetensors_check_reads_only_the_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(64, 64)}, str(path))
    assert safetensors_problem(path) is None
    data = path.read_bytes()
    for cut in (4, 40, len(data) - 1):
        path.write_bytes(data[:cut])
        assert safetensors_problem(path) is not None


def test_merge_and_push_wait_their_turn_and_merged_follows_the_umask(finished_run, tmp_path):
    _, finished = finished_run
    run = _copy(finished, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom qtune.rundir import RunDir\n"
         f"with RunDir({str(run)!r}).lock('train'):\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (("merge", run), ("push", run, "--repo-id", "me/x", "--dry-run", tmp_path / "s")):
            line = _one_error(run_qtune(*args))
            assert f"is in use by qtune train (pid {holder.pid} " in line, line
        assert not (run / "merged").exists() and not (tmp_path / "s").exists()
    finally:
        holder.kill()
        holder.wait()
    previous_mask = os.umask(0o022)  # inherited by the subprocess
    try:
        merged = run_qtune_in_process("merge", run)
    finally:
        os.umask(previous_mask)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (run / "merged").stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0700
    assert "merged" in json.loads((run / ".qtune-manifest.json").read_text())["written"]


def test_merge_refuses_a_base_whose_weights_changed_or_vanished(finished_run, tmp_path, tiny_llama):
    _, finished = finished_run
    run = _copy(finished, tmp_path)
    moved = tmp_path / "base"
    shutil.copytree(tiny_llama, moved)
    recipe_file = run / "recipe.yaml"
    recipe_file.write_text(recipe_file.read_text().replace(str(tiny_llama), str(moved)))
    weights = moved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor: same shapes, other weights
    weights.write_bytes(bytes(data))
    assert "differ from those the run trained on" in _one_error(run_qtune_in_process("merge", run))
    shutil.rmtree(moved)
    assert "cannot load the base model" in _one_error(run_qtune_in_process("merge", run))
    assert not (run / "merged").exists()


def test_unlucky_model_folders_end_in_one_error_line(make_recipe, tiny_llama, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama / name, no_tokenizer / name)
    assert "cannot load a tokenizer" in _one_error(run_qtune_in_process("train", make_recipe(model={"name": str(no_tokenizer)}),
                                                                  "--check"))  # fmt: skip
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled)
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    recipe = make_recipe(model={"name": str(pickled)})
    line = _one_error(run_qtune_in_process("train", recipe, "--check"))
    assert "weights are pickle files" in line
    assert "--allow-pickle" in run_qtune_in_process("train", recipe, "--check").stderr
    accepted = run_qtune_in_process("train", recipe, "--check", "--allow-pickle")
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("x")
    assert "neither a run directory" in _one_error(
        run_qtune_in_process("export-gguf", neither, "--out", tmp_path / "x.gguf")
    )
    assert "not a qtune run directory" in _one_error(run_qtune_in_process("merge", neither))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(make_recipe().parent / "train.jsonl", mixed / "a.jsonl")
    (mixed / "b.csv").write_text("text\nhello\n")
    line = _one_error(run_qtune_in_process("train", make_recipe(data={"datasets": [{"path": str(mixed)}]}), "--check"))
    assert "mixes data formats" in line and "b.csv" in line
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_llama, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a download cut short
    recipe = make_recipe(model={"name": str(truncated)}, output_dir=str(tmp_path / "never-made"))
    line = _one_error(run_qtune_in_process("train", recipe, "--quiet"))
    assert "model.safetensors" in line
    assert not (tmp_path / "never-made").exists()  # no empty run dir with a lock file left behind
