"""Recipe → TRL `SFTConfig` + `SFTTrainer`, run, and save the adapter. The only module that knows TRL/HF
training argument names; the training loop itself is TRL's."""

from __future__ import annotations

import dataclasses
import difflib
import json
import shutil
import time
from pathlib import Path

from qtune.config import Recipe, dump_recipe
from qtune.errors import QtuneError
from qtune.model import Launch

# Outputs qtune writes into a run directory; `overwrite` removes exactly these, nothing else.
RUN_OUTPUTS = ("adapter", "checkpoints", "recipe.yaml", "summary.json", "metrics.jsonl", "loss.png")

# SFTConfig arguments the schema already names: setting them again in training.extra is ambiguous.
NAMED_BY_SCHEMA = {
    "output_dir": "output_dir",
    "num_train_epochs": "training.epochs",
    "max_steps": "training.max_steps",
    "per_device_train_batch_size": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "learning_rate": "training.lr",
    "lr_scheduler_type": "training.scheduler",
    "warmup_steps": "training.warmup_ratio",
    "optim": "training.optimizer",
    "weight_decay": "training.weight_decay",
    "max_grad_norm": "training.max_grad_norm",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "activation_checkpointing": "training.gradient_checkpointing",
    "logging_steps": "training.logging_steps",
    "eval_steps": "training.eval_steps",
    "save_steps": "training.save_steps",
    "save_total_limit": "training.save_total_limit",
    "seed": "training.seed",
    "bf16": "training.precision",
    "fp16": "training.precision",
    "max_length": "data.max_length",
    "packing": "data.packing",
    "report_to": "tracking.backend",
    "run_name": "tracking.run_name",
    "completion_only_loss": "data.train_on",
    "assistant_only_loss": "data.train_on",
    "push_to_hub": "hub.push",
    "hub_token": "hub (set HF_TOKEN in the environment)",
}


def check_launch(recipe: Recipe, launch: Launch) -> None:
    """Launch topology × placement × quantization × checkpointing, before any model loads."""
    extra = recipe.training.extra
    if launch.distributed and recipe.model.device_map == "auto":
        raise QtuneError(
            f"model.device_map: auto spreads one process's model over its GPUs, but this launch has "
            f"{launch.world_size} processes ({launch.distributed_type})",
            "drop model.device_map for DDP/FSDP (one replica or shard per rank), or launch a single process",
        )
    if launch.distributed and recipe.training.gradient_checkpointing:
        reentrant = extra.get("gradient_checkpointing_kwargs") or extra.get("activation_checkpointing_kwargs") or {}
        if reentrant.get("use_reentrant"):
            raise QtuneError(
                "training.extra.gradient_checkpointing_kwargs.use_reentrant: true breaks gradient checkpointing "
                f"under DDP ({launch.world_size} processes): frozen 4-bit layers leave reentrant segments without grads",
                "remove it; qtune uses non-reentrant checkpointing",
            )
        if extra.get("ddp_find_unused_parameters"):
            raise QtuneError(
                "training.extra.ddp_find_unused_parameters: true with gradient checkpointing under DDP marks "
                "parameters ready twice and fails in backward",
                "remove it (qtune sets it to false), or set training.gradient_checkpointing: false",
            )
    if launch.distributed_type in ("FSDP", "DEEPSPEED"):
        raise QtuneError(
            f"{launch.distributed_type} launch: FSDP-QLoRA and DeepSpeed are not supported by qtune yet",
            "launch DDP (accelerate launch --multi_gpu) or a single process",
        )
    if recipe.hub.push:
        raise QtuneError("hub.push: publishing from `train` is not implemented yet", "set hub.push: false")


def _precision(recipe: Recipe) -> dict:
    import torch

    choice = recipe.training.precision
    if choice == "auto":
        if torch.cuda.is_available():
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            choice = "fp32"
    if choice == "fp16" and not torch.cuda.is_available():
        raise QtuneError("training.precision: fp16 mixed precision needs a GPU", "use fp32 or bf16 on the CPU")
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def _report_to(recipe: Recipe) -> str | list[str]:
    t = recipe.tracking
    if t.backend == "none":
        return "none"
    if t.backend == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise QtuneError(
                "tracking.backend: tensorboard is not installed", "pip install tensorboard, or use wandb / none"
            ) from None
    return [t.backend]


def sft_config(recipe: Recipe, launch: Launch, loss_settings: dict | None = None):
    """The SFTConfig for the recipe; `training.extra` passes further arguments through, checked by name."""
    import torch
    from trl import SFTConfig

    t = recipe.training
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    for key in t.extra:
        if key in NAMED_BY_SCHEMA:
            raise QtuneError(
                f"training.extra.{key}: already set by the recipe key {NAMED_BY_SCHEMA[key]}",
                f"set {NAMED_BY_SCHEMA[key]} instead",
            )
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            suggestion = ""
            if close and close[0] in NAMED_BY_SCHEMA:  # don't send the user on to the error above
                suggestion = f"did you mean '{close[0]}'? the recipe sets it as {NAMED_BY_SCHEMA[close[0]]}; "
            elif close:
                suggestion = f"did you mean '{close[0]}'? "
            raise QtuneError(
                f"training.extra.{key}: SFTConfig has no argument '{key}'",
                suggestion + "see TRL's SFTConfig / transformers' TrainingArguments",
            )
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    run_dir = Path(recipe.output_dir)
    eval_on = recipe.data.eval_split is not None
    kwargs = dict(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if eval_on else "no",
        eval_steps=(t.eval_steps or t.logging_steps) if eval_on else None,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        report_to=_report_to(recipe),
        run_name=recipe.tracking.run_name,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False if launch.distributed else None,
        disable_tqdm=not launch.is_main,
        **{ckpt: t.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False}},
        **_precision(recipe),
        **(loss_settings or {}),
    )
    kwargs.update(t.extra)
    _check_choice("training.optimizer", t.optimizer, "transformers.training_args", "OptimizerNames")
    _check_choice("training.scheduler", t.scheduler, "transformers.trainer_utils", "SchedulerType")
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        raise QtuneError(f"training: SFTConfig refused the arguments: {str(exc).strip().splitlines()[0]}") from None


def _check_choice(key: str, value: str, module: str, enum_name: str) -> None:
    """An optimizer or scheduler name transformers knows, with a short did-you-mean instead of its full list."""
    import importlib

    choices = [e.value for e in getattr(importlib.import_module(module), enum_name)]
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=3)
        raise QtuneError(
            f"{key}: unknown name '{value}' (transformers {enum_name})",
            (f"did you mean {' or '.join(close)}? " if close else "")
            + f"{len(choices)} names: {', '.join(choices[:8])} …",
        )


def prepare_run_dir(recipe: Recipe, launch: Launch) -> Path:
    """Refuse an earlier run's non-empty directory unless resume or overwrite says what to do with it."""
    run_dir = Path(recipe.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise QtuneError(f"output_dir: {run_dir} exists and is not a directory")
    existing = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    t = recipe.training
    if t.resume:
        if not latest_checkpoint(run_dir):
            raise QtuneError(
                f"training.resume: no checkpoint in {run_dir / 'checkpoints'}",
                "set training.save_steps so runs leave checkpoints, or start without --resume",
            )
    elif existing and not t.overwrite:
        raise QtuneError(
            f"output_dir: {run_dir} already holds an earlier run ({', '.join(existing[:4])})",
            "pass --overwrite (or training.overwrite: true) to replace it, --resume to continue it, "
            "or set output_dir=<new dir>",
        )
    probe = run_dir if run_dir.is_dir() else next(p for p in [run_dir, *run_dir.parents] if p.exists())
    if not _writable(probe):
        raise QtuneError(f"output_dir: cannot write to {probe}", "choose a writable output_dir")
    return run_dir


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK)


def latest_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = run_dir / "checkpoints"
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _clear_previous_outputs(run_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _adapter_fingerprint(model) -> str:
    """SHA-256 over the trainable weights' bytes: equal across ranks exactly when DDP kept replicas in sync."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _tracking_env(recipe: Recipe) -> None:
    """transformers' W&B integration reads its settings from the environment; the recipe sets them."""
    import os

    t = recipe.tracking
    if t.backend != "wandb":
        return
    settings = {
        "WANDB_PROJECT": t.project,
        "WANDB_ENTITY": t.entity,
        "WANDB_RUN_GROUP": t.group,
        "WANDB_TAGS": ",".join(t.tags) if t.tags else None,
        "WANDB_MODE": t.mode if "WANDB_MODE" not in os.environ else None,  # an explicit env wins (e.g. disabled)
    }
    os.environ.update({k: v for k, v in settings.items() if v})


def run(recipe: Recipe, model, tokenizer, dataset, args, launch: Launch) -> Path:
    """Train with TRL's SFTTrainer and save the adapter (safetensors, no pickles) into output_dir/adapter."""
    from accelerate import PartialState
    from trl import SFTTrainer

    run_dir = Path(recipe.output_dir)
    state = PartialState()
    _tracking_env(recipe)
    if launch.is_main:
        if recipe.training.overwrite:
            _clear_previous_outputs(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, run_dir / "recipe.yaml")
    state.wait_for_everyone()

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset["train"],
        eval_dataset=dataset.get("eval"),
        processing_class=tokenizer,
    )
    started = time.time()
    result = trainer.train(resume_from_checkpoint=latest_checkpoint(run_dir) if recipe.training.resume else None)
    wall = time.time() - started

    final_eval = trainer.evaluate() if dataset.get("eval") is not None else {}  # all ranks take part
    fingerprints = [_adapter_fingerprint(trainer.model)]
    if launch.distributed:
        import torch.distributed as dist

        gathered: list = [None] * launch.world_size
        dist.all_gather_object(gathered, fingerprints[0])
        fingerprints = gathered

    if launch.is_main:
        adapter_dir = run_dir / "adapter"
        staging = run_dir / "adapter.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        staging.rename(adapter_dir)
        summary = {
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "eval_loss": final_eval.get("eval_loss"),
            "wall_time_s": round(wall, 2),
            "world_size": launch.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
            "backend": trainer.accelerator.state.backend,
            "adapter_fingerprint_per_rank": fingerprints,
            "replicas_identical": len(set(fingerprints)) == 1,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if not summary["replicas_identical"]:
            print(f"qtune: warning: DDP replicas diverged: adapter fingerprints {fingerprints}", flush=True)
        print(f"qtune: adapter saved to {adapter_dir} ({summary['steps']} steps, {wall:.1f}s)", flush=True)
    state.wait_for_everyone()
    return run_dir
