"""The run directory: its layout, reading a finished run back, and the rules for writing into it.

Every other module asks a `RunDir` for a path instead of spelling one. Outputs are written beside their
destination and renamed into place (`staged_output`, `write_text_atomic`), so a crash leaves the old or the new.

    runs/<name>/
      recipe.yaml      the resolved recipe          adapter/       safetensors adapter + tokenizer
      checkpoints/     trainer checkpoints          metrics.jsonl  one line per log step
      summary.json     final figures                loss.png       the loss curve (rewards.png: preference margins/accuracy;
                                                                   reward.png: grpo / rloo mean reward, train and held-out)
      samples.jsonl    grpo / rloo: prompts, completions and rewards every samples_every steps
      tensorboard/     TensorBoard events           wandb_run_id   the W&B run a resume continues
      merged/          after `qtune merge`          wandb/         W&B offline runs (never removed by qtune)
      mlflow_run_id    the MLflow run a resume continues
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qtune.config import Recipe
from qtune.errors import QtuneError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
LOCK = ".qtune.lock"  # held (flock) by the one process writing the run dir; says who that is
MANIFEST = ".qtune-manifest.json"  # the entries qtune wrote here: the only ones --overwrite ever moves
PREVIOUS = ".qtune-previous"  # an overwrite's previous outputs, kept until the new run has produced an adapter

# Recipe keys that define what a checkpoint's weights mean: resuming under other values would load an
# adapter into a different base or shape (or silently change the function being trained).
RESUME_MUST_MATCH = (
    ("model", "name"),
    ("model", "revision"),
    ("quantization", "backend"),
    ("quantization", "bits"),
    ("quantization", "quant_type"),
    ("quantization", "double_quant"),
    ("quantization", "quant_storage"),
    ("lora", "r"),
    ("lora", "alpha"),
    ("lora", "target_modules"),
    ("lora", "modules_to_save"),
    ("lora", "bias"),
    ("lora", "use_rslora"),
    ("lora", "use_dora"),
)


@dataclass(frozen=True)
class RunDir:
    """A run directory. `recipe` is the run's resolved recipe: the one training with, or the one read back."""

    path: Path
    recipe: Recipe | None = None

    # Outputs `train` writes; `--overwrite` removes exactly these, nothing else (not wandb/: an unsynced
    # offline W&B run is never deleted).
    OUTPUTS = (
        "adapter", "checkpoints", "recipe.yaml", "summary.json", "metrics.jsonl", "loss.png", "rewards.png",
        "reward.png", "samples.jsonl", "tensorboard", "wandb_run_id", "mlflow_run_id",
    )  # fmt: skip

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def reward_plot(self) -> Path:
        """Preference methods: the implicit reward margins and accuracy per step."""
        return self.path / "rewards.png"

    @property
    def reward_curve(self) -> Path:
        """grpo / rloo: the mean reward of the training batches and of the held-out prompts per step."""
        return self.path / "reward.png"

    @property
    def samples(self) -> Path:
        """grpo / rloo: a few prompts with their completions and rewards every samples_every steps."""
        return self.path / "samples.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def wandb_run_id(self) -> Path:
        return self.path / "wandb_run_id"

    @property
    def mlflow_run_id(self) -> Path:
        return self.path / "mlflow_run_id"

    # ----------------------------------------------------------------------- reading a finished run back

    @classmethod
    def open(cls, run_dir: str | os.PathLike) -> RunDir:
        """A finished run: RUN_DIR/recipe.yaml read back, RUN_DIR/adapter holding a safetensors adapter. What a
        killed `train` left half done (an overwrite, an adapter swap) is finished first (`recover`)."""
        from qtune.config import load_recipe

        path = Path(run_dir)
        if not path.is_dir():
            raise QtuneError(f"{path}: no such run directory", "give the output_dir of a finished `qtune train`")
        run = cls(path)
        if (path / PREVIOUS).is_dir() or (path / "adapter.old").is_dir():  # a train killed halfway: finish it
            run.check_unlocked()
            with run.lock("recover"):
                run.recover()
        if not run.recipe_file.is_file():
            raise QtuneError(
                f"{path}: not a qtune run directory (no recipe.yaml): a run directory is the output_dir of `qtune "
                "train`, holding recipe.yaml (the resolved recipe), adapter/ (the trained adapter) and summary.json",
                "give the output_dir of a finished `qtune train`, or a model folder where a MODEL is accepted",
            )
        if not (run.adapter / "adapter_config.json").is_file():
            raise QtuneError(
                f"{path}: the run has no adapter ({run.adapter}/adapter_config.json is missing)",
                "the training did not finish; run `qtune train RECIPE --resume` or train again",
            )
        if not (run.adapter / "adapter_model.safetensors").is_file():
            pickled = [p.name for p in run.adapter.iterdir() if p.suffix in PICKLE_SUFFIXES]
            raise QtuneError(
                f"{run.adapter}: no adapter_model.safetensors"
                + (f" (only pickle weights: {', '.join(pickled)})" if pickled else ""),
                "qtune loads adapters from safetensors only; convert it with peft "
                "(save_pretrained(safe_serialization=True))",
            )
        return cls(path, load_recipe(run.recipe_file))

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        """PATH looks like a run directory (it has a recipe.yaml); `open` says what else it lacks."""
        return (Path(path) / "recipe.yaml").is_file()

    def summary(self) -> dict | None:
        """summary.json, None when the run has none."""
        if not self.summary_file.is_file():
            return None
        return json.loads(self.summary_file.read_text(encoding="utf-8"))

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl: one dict per log step (loss, lr, grad norm, tokens/s, memory …), [] when there is none."""
        if not self.metrics.is_file():
            return []
        lines = self.metrics.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def require_merged(self) -> Path:
        if not (self.merged / "config.json").is_file():
            raise QtuneError(f"{self.merged}: no merged model in the run", f"run `qtune merge {self.path}` first")
        return self.merged

    # ----------------------------------------------------------------------- starting or resuming a run

    def checkpoint_steps(self) -> list[Path]:
        """Checkpoint folders, newest first."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.rsplit("-", 1)[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True)

    def latest_checkpoint(self, notice=None) -> str | None:
        """The newest intact checkpoint. One a crash cut short while saving (no trainer_state.json, which the
        Trainer writes last) is passed over silently; a damaged one (a truncated or unreadable file, an adapter
        of another shape) is named through `notice` and passed over for the one before."""
        for folder in self.checkpoint_steps():
            if not (folder / "trainer_state.json").is_file():
                continue
            problem = checkpoint_problem(folder)
            if problem is None:
                return str(folder)
            if notice is not None:
                notice(f"qtune: warning: {folder} is damaged ({problem}); passing over it")
        return None

    def check_can_start(self, notices: bool = True) -> str | None:
        """Refuse an earlier run's non-empty directory unless resume or overwrite says what to do with it.
        Returns the checkpoint to resume from (None: a fresh start). Changes nothing on disk. notices=False: a
        second check that does not repeat the notes of the first (a damaged checkpoint passed over)."""
        import sys

        recipe, run_dir = self.recipe, self.path
        if str(recipe.output_dir).strip() in ("", "."):
            raise QtuneError(
                f"output_dir: '{recipe.output_dir}' would write the run into the current directory",
                "give the run its own folder, e.g. output_dir=runs/my-run",
            )
        if run_dir.is_symlink() and not run_dir.exists():
            raise QtuneError(f"output_dir: {run_dir} is a dangling symbolic link")
        if run_dir.exists() and not run_dir.is_dir():
            raise QtuneError(f"output_dir: {run_dir} exists and is not a directory")
        self.check_unlocked()
        existing = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []
        t = recipe.training
        if t.resume and self.finished():
            raise RunFinished(self)
        notice = (lambda text: print(text, file=sys.stderr)) if notices else None
        checkpoint = self.latest_checkpoint(notice=notice) if t.resume else None
        if t.resume is True and not checkpoint:
            damaged = [p.name for p in self.checkpoint_steps()]
            raise QtuneError(
                f"training.resume: no checkpoint in {self.checkpoints}"
                + (f" (damaged or incomplete: {', '.join(damaged)})" if damaged else ""),
                "set training.save_steps so runs leave checkpoints, or start without --resume",
            )
        if checkpoint:
            self.check_resume_matches(checkpoint)
        elif existing and not t.overwrite:
            raise QtuneError(
                f"output_dir: {run_dir} already holds an earlier run ({', '.join(existing[:4])})",
                "pass --overwrite (or training.overwrite: true) to replace it, --resume to continue it, "
                "or set output_dir=<new dir>",
            )
        elif existing:
            ours = set(self.manifest())
            foreign = [n for n in (*self.OUTPUTS, "merged") if n not in ours and (run_dir / n).exists()]
            if foreign:
                raise QtuneError(
                    f"output_dir: {run_dir} holds {', '.join(foreign)}, which qtune did not write there; --overwrite "
                    "replaces only a qtune run's own outputs",
                    "move them out of the way, or set output_dir=<new dir>",
                )
        probe = writable_ancestor(run_dir)
        if probe is not None:
            raise QtuneError(f"output_dir: cannot write to {probe}", "choose a writable output_dir")
        return checkpoint

    def finished(self) -> bool:
        """The run saved its adapter after its last step (summary.json says so) and the recipe asks no more."""
        try:
            summary = self.summary() if self.adapter.is_dir() else None
        except (OSError, ValueError):
            return False
        if not isinstance(summary, dict) or not summary.get("steps"):
            return False
        target = self.recipe.training.max_steps or summary.get("max_steps") or 0
        return summary["steps"] >= target

    def check_resume_matches(self, checkpoint: str) -> None:
        """Refuse to resume a checkpoint written under another model or adapter shape (run_dir/recipe.yaml)."""
        import yaml

        from qtune.config import recipe_to_dict

        if not self.recipe_file.is_file():
            raise QtuneError(
                f"training.resume: {self.recipe_file} is missing, so {checkpoint} cannot be checked against this recipe",
                "start a new run (output_dir=<new dir>) or --overwrite",
            )
        try:
            saved = yaml.safe_load(self.recipe_file.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise QtuneError(
                f"training.resume: {self.recipe_file} is damaged ({type(exc).__name__}), so {checkpoint} cannot be "
                "checked against this recipe",
                "start a new run (output_dir=<new dir>) or --overwrite",
            ) from None
        now = recipe_to_dict(self.recipe)
        changed = []
        for section, key in RESUME_MUST_MATCH:
            before = (saved.get(section) or {}).get(key) if isinstance(saved, dict) else None
            after = now[section][key]
            if before != after:
                changed.append(f"{section}.{key} {before!r} -> {after!r}")
        adapter = json.loads((Path(checkpoint) / "adapter_config.json").read_text(encoding="utf-8"))
        if not changed and adapter.get("r") != self.recipe.lora.r:  # a checkpoint copied in from another run
            changed.append(f"lora.r {adapter.get('r')!r} (in {Path(checkpoint).name}) -> {self.recipe.lora.r!r}")
        if changed:
            raise QtuneError(
                f"training.resume: {checkpoint} was trained with a different recipe: {'; '.join(changed)}",
                f"resume with the run's own settings (see {self.recipe_file}), or start a new run with "
                "output_dir=<new dir> (or --overwrite to replace this one)",
            )

    # ----------------------------------------------------------------------- one writer, and what it wrote

    def check_unlocked(self) -> None:
        """Refuse while another live process holds the run dir's lock (train, merge or push)."""
        holder = _lock_holder(self.path / LOCK)
        if holder is not None:
            raise QtuneError(f"{self.path} is in use by {holder}", _BUSY_HINT)

    @contextlib.contextmanager
    def lock(self, command: str):
        """Hold the run dir for one writer until the block ends (any exit: the OS drops a dead process's flock,
        so a lock file left by a killed process is free). A second `train`, `merge` or `push` on the same run
        dir is refused with the holder's pid, host and start time. Re-entrant within one process (`train` with
        hub.push pushes under its own lock)."""
        import fcntl
        import socket
        import time

        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD:
            yield self
            return
        handle = open(self.path / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held for the block)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                raise QtuneError(f"{self.path} is in use by {_describe_holder(handle.read())}", _BUSY_HINT) from None
            handle.seek(0)
            handle.truncate()
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            handle.write(json.dumps({**info, "command": command}) + "\n")
            handle.flush()
            _HELD.add(key)
            try:
                yield self
            finally:
                _HELD.discard(key)
                if created and [p.name for p in self.path.iterdir()] == [LOCK]:
                    # nothing was written (e.g. the base failed to load): leave no empty run dir behind. The lock
                    # file goes while still held, so no other process can be holding it.
                    (self.path / LOCK).unlink()
                    with contextlib.suppress(OSError):
                        self.path.rmdir()
        finally:
            handle.close()  # releases the flock

    def manifest(self) -> list[str]:
        """The entries qtune wrote here. A run dir from before the manifest: the outputs `train` writes that are
        there, as long as the dir holds a qtune recipe.yaml."""
        path = self.path / MANIFEST
        if path.is_file():
            try:
                return [n for n in json.loads(path.read_text(encoding="utf-8"))["written"] if "/" not in n]
            except (ValueError, KeyError, TypeError):
                pass  # damaged: fall back to what a qtune run dir holds
        if not self.recipe_file.is_file():
            return []
        return [n for n in (*self.OUTPUTS, "merged") if (self.path / n).exists() or (self.path / n).is_symlink()]

    def record_written(self, *names: str) -> None:
        """Add entries to the manifest (main process, under the lock)."""
        written = sorted(set(self.manifest()) | set(names))
        write_text_atomic(self.path / MANIFEST, json.dumps({"written": written}, indent=1) + "\n")

    def set_aside_previous(self) -> list[str]:
        """--overwrite: move the previous run's outputs (the manifest's entries, nothing else; a symbolic link is
        moved as a link, never followed) into .qtune-previous/, where they stay until the new run has an adapter
        (`drop_previous`) or come back on failure (`restore_previous`). Returns what was moved."""
        names = [n for n in self.manifest() if (self.path / n).exists() or (self.path / n).is_symlink()]
        if not names:
            return []
        aside = self.path / PREVIOUS
        aside.mkdir()
        for name in names:
            os.rename(self.path / name, aside / name)
        if (self.path / MANIFEST).exists():
            os.rename(self.path / MANIFEST, aside / MANIFEST)
        return names

    def drop_previous(self) -> None:
        """The new run stands: delete the previous run's outputs set aside."""
        aside = self.path / PREVIOUS
        if aside.is_dir():
            shutil.rmtree(aside)

    def restore_previous(self) -> bool:
        """The new run failed before it had an adapter: remove what it wrote and put the previous run back."""
        aside = self.path / PREVIOUS
        if not aside.is_dir():
            return False
        for name in self.manifest():
            target = self.path / name
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
        (self.path / MANIFEST).unlink(missing_ok=True)
        for item in aside.iterdir():
            os.rename(item, self.path / item.name)
        aside.rmdir()
        return True

    def has_new_adapter(self) -> bool:
        """The run in progress has produced an adapter: its final one, or a checkpoint it can resume from."""
        return (self.adapter / "adapter_model.safetensors").is_file() or self.latest_checkpoint() is not None

    def recover(self) -> str | None:
        """Finish what a killed process left half done (under the lock, before anything else): an overwrite
        that never produced an adapter is rolled back, one that did is committed; an adapter replaced halfway
        is put back. Returns what was done, for a notice."""
        done = None
        old_adapter = self.path / "adapter.old"
        if old_adapter.is_dir() and not self.adapter.exists():
            os.rename(old_adapter, self.adapter)
            done = "restored adapter/ from an interrupted save"
        elif old_adapter.is_dir():
            shutil.rmtree(old_adapter)
        staging = self.path / "adapter.tmp"
        if staging.is_dir():
            shutil.rmtree(staging)
        if (self.path / PREVIOUS).is_dir():
            if self.has_new_adapter():
                self.drop_previous()
            else:
                self.restore_previous()
                done = "restored the previous run that an interrupted --overwrite had set aside"
        return done

    def replace_adapter(self, staging: Path) -> None:
        """Put a complete staged adapter folder in place: the old one is renamed aside first and removed last,
        so a kill at any instant leaves one complete adapter/ (or adapter.old/, which `recover` puts back)."""
        fsync_tree(staging)
        old = self.path / "adapter.old"
        if self.adapter.exists():
            os.rename(self.adapter, old)
        os.rename(staging, self.adapter)
        _fsync_dir(self.path)
        if old.exists():
            shutil.rmtree(old)


_BUSY_HINT = "wait for it to finish (or stop it), or use another run directory"
_HELD: set[str] = set()  # run dirs whose lock this process holds


class RunFinished(QtuneError):
    """--resume on a run that has already saved its adapter after its last step: nothing to do."""

    def __init__(self, run: RunDir):
        summary = run.summary() or {}
        target = summary.get("max_steps") or run.recipe.training.max_steps
        super().__init__(
            f"{run.path}: the run is finished ({summary.get('steps')} of {target} steps, adapter saved); nothing "
            "was changed",
            "raise training.max_steps to train further, or start a new run with output_dir=<new dir> (or --overwrite)",
        )


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"qtune {info['command']} (pid {info['pid']} on {info['host']}, started {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "another qtune process"


def _lock_holder(path: Path) -> str | None:
    """Who holds the lock file's flock, None when nobody (or no lock file, or this very process)."""
    import fcntl

    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read()
            with contextlib.suppress(ValueError, TypeError, KeyError):
                if json.loads(text)["pid"] == os.getpid():
                    return None
            return _describe_holder(text)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, None when every file opens: trainer_state.json parses, the
    adapter's safetensors header and data are whole, its config parses, and every torch file
    (optimizer, scheduler, RNG states: zip archives) passes its CRC check. Reads no tensor into memory."""
    import zipfile

    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return "trainer_state.json has no global_step"
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"trainer_state.json: {type(exc).__name__}"
    adapter = folder / "adapter_model.safetensors"
    if not adapter.is_file():
        return "no adapter_model.safetensors"
    problem = safetensors_problem(adapter)
    if problem:
        return f"adapter_model.safetensors: {problem}"
    try:
        json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"adapter_config.json: {type(exc).__name__}"
    for torch_file in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        try:
            with zipfile.ZipFile(torch_file) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            return f"{torch_file.name}: {type(exc).__name__}"
        if bad is not None:
            return f"{torch_file.name}: corrupt member {bad}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file's header parses and every tensor's bytes lie inside the file."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return "truncated header"
            header = json.loads(handle.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable header ({type(exc).__name__})"
    if 8 + length + end > size:
        return f"truncated: {size} bytes, the header describes {8 + length + end}"
    return None


# --------------------------------------------------------------------------- writing outputs safely


def writable_ancestor(path: Path) -> Path | None:
    """None when PATH (or, if it does not exist yet, its nearest existing ancestor) is writable; else that
    folder, for the error message."""
    probe = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if probe.is_file():
        probe = probe.parent
    return None if os.access(probe, os.W_OK) else probe


def check_output_dir(out: Path, overwrite: bool = False) -> None:
    """A destination folder (--out) is new (or an empty folder, or --overwrite) and can be written."""
    if out.exists() and not out.is_dir():
        raise QtuneError(f"{out}: exists and is not a directory", "choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QtuneError(f"{out}: output directory is not empty", "choose another --out, or remove this one first")
    probe = writable_ancestor(out.parent if out.parent != Path("") else Path("."))
    if probe is not None:
        raise QtuneError(f"{out}: cannot write to {probe}", "choose a writable --out")


@contextlib.contextmanager
def staged_output(out: Path):
    """A fresh temporary folder beside `out` (same filesystem): when the block succeeds it replaces `out` in
    one rename; when it fails it is removed. `out` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it private (0700); outputs follow the umask
    try:
        yield staging
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{staging.name.rsplit('-', 1)[-1]}")
    if out.exists():
        os.rename(out, old)  # the previous output stays whole until the new one is in place
    staging.rename(out)
    _fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old)


def current_umask() -> int:
    """The process's umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside PATH, flush to disk, rename over it: readers see the old file or the new one."""
    staged = path.with_name(f".{path.name}.tmp")
    try:
        with open(staged, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def fsync_tree(folder: Path) -> None:
    """Flush every file under FOLDER (and the folders) to disk before a rename publishes it."""
    for item in sorted(folder.rglob("*")):
        if item.is_file() and not item.is_symlink():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(sub)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_no_pickle_files(folder: Path) -> None:
    """Before publishing: no pickle file slipped in (a library changed its default)."""
    pickled = [p.name for p in folder.rglob("*") if p.name.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise QtuneError(f"refusing to publish pickle files: {', '.join(pickled)}")
