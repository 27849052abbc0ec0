"""The run directory: its layout, reading a finished run back, and the rules for writing into it.

Every other module asks a `RunDir` for a path instead of spelling one. Outputs are written beside their
destination and renamed into place (`staged_output`, `write_text_atomic`), so a crash leaves the old or the new.

    runs/<name>/
      recipe.yaml      the resolved recipe          adapter/       safetensors adapter + tokenizer
      checkpoints/     trainer checkpoints          metrics.jsonl  one line per log step
      summary.json     final figures                loss.png       the loss curve
      tensorboard/     TensorBoard events           wandb_run_id   the W&B run a resume continues
      merged/          after `qtune merge`          wandb/         W&B offline runs (never removed by qtune)
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

# Recipe keys that define what a checkpoint's weights mean: resuming under other values would load an
# adapter into a different base or shape (or silently change the function being trained).
RESUME_MUST_MATCH = (
    ("model", "name"),
    ("model", "revision"),
    ("quantization", "bits"),
    ("quantization", "quant_type"),
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
        "adapter", "checkpoints", "recipe.yaml", "summary.json", "metrics.jsonl", "loss.png", "tensorboard", "wandb_run_id"
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
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def wandb_run_id(self) -> Path:
        return self.path / "wandb_run_id"

    # ----------------------------------------------------------------------- reading a finished run back

    @classmethod
    def open(cls, run_dir: str | os.PathLike) -> RunDir:
        """A finished run: RUN_DIR/recipe.yaml read back, RUN_DIR/adapter holding a safetensors adapter."""
        from qtune.config import load_recipe

        path = Path(run_dir)
        if not path.is_dir():
            raise QtuneError(f"{path}: no such run directory", "give the output_dir of a finished `qtune train`")
        run = cls(path)
        if not run.recipe_file.is_file():
            raise QtuneError(
                f"{path}: not a qtune run directory (no recipe.yaml)",
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

    def require_merged(self) -> Path:
        if not (self.merged / "config.json").is_file():
            raise QtuneError(f"{self.merged}: no merged model in the run", f"run `qtune merge {self.path}` first")
        return self.merged

    # ----------------------------------------------------------------------- starting or resuming a run

    def latest_checkpoint(self) -> str | None:
        """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a folder without it is
        one a crash (SIGKILL, power loss) cut short while saving; resume skips it for the one before."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if not self.checkpoints.is_dir():
            return None
        complete = [
            p
            for p in self.checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
            if p.name.rsplit("-", 1)[-1].isdigit() and (p / "trainer_state.json").is_file()
        ]
        return str(max(complete, key=lambda p: int(p.name.rsplit("-", 1)[-1]))) if complete else None

    def check_can_start(self) -> str | None:
        """Refuse an earlier run's non-empty directory unless resume or overwrite says what to do with it.
        Returns the checkpoint to resume from (None: a fresh start)."""
        recipe, run_dir = self.recipe, self.path
        if run_dir.exists() and not run_dir.is_dir():
            raise QtuneError(f"output_dir: {run_dir} exists and is not a directory")
        existing = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        t = recipe.training
        checkpoint = self.latest_checkpoint() if t.resume else None
        if t.resume is True and not checkpoint:
            raise QtuneError(
                f"training.resume: no checkpoint in {self.checkpoints}",
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
        probe = writable_ancestor(run_dir)
        if probe is not None:
            raise QtuneError(f"output_dir: cannot write to {probe}", "choose a writable output_dir")
        return checkpoint

    def check_resume_matches(self, checkpoint: str) -> None:
        """Refuse to resume a checkpoint written under another model or adapter shape (run_dir/recipe.yaml)."""
        import yaml

        from qtune.config import recipe_to_dict

        if not self.recipe_file.is_file():
            raise QtuneError(
                f"training.resume: {self.recipe_file} is missing, so {checkpoint} cannot be checked against this recipe",
                "start a new run (output_dir=<new dir>) or --overwrite",
            )
        saved = yaml.safe_load(self.recipe_file.read_text(encoding="utf-8")) or {}
        now = recipe_to_dict(self.recipe)
        changed = []
        for section, key in RESUME_MUST_MATCH:
            before, after = (saved.get(section) or {}).get(key), now[section][key]
            if before != after:
                changed.append(f"{section}.{key} {before!r} -> {after!r}")
        if changed:
            raise QtuneError(
                f"training.resume: {checkpoint} was trained with a different recipe: {'; '.join(changed)}",
                f"resume with the run's own settings (see {self.recipe_file}), or start a new run with "
                "output_dir=<new dir> (or --overwrite to replace this one)",
            )

    def clear_outputs(self) -> None:
        """Remove what an earlier `train` wrote here (RunDir.OUTPUTS), nothing else."""
        for name in self.OUTPUTS:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


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
        raise QtuneError(f"{out}: output directory is not empty", "choose another --out, or pass --overwrite")
    probe = writable_ancestor(out.parent if out.parent != Path("") else Path("."))
    if probe is not None:
        raise QtuneError(f"{out}: cannot write to {probe}", "choose a writable --out")


@contextlib.contextmanager
def staged_output(out: Path):
    """A fresh temporary folder beside `out` (same filesystem): when the block succeeds it replaces `out` in
    one rename; when it fails it is removed. `out` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside PATH, flush to disk, rename over it: readers see the old file or the new one."""
    staged = path.with_name(f".{path.name}.tmp")
    with open(staged, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staged, path)


def check_no_pickle_files(folder: Path) -> None:
    """Before publishing: no pickle file slipped in (a library changed its default)."""
    pickled = [p.name for p in folder.rglob("*") if p.name.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise QtuneError(f"refusing to publish pickle files: {', '.join(pickled)}")
