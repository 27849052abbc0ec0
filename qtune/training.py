"""Recipe → the method's TRL config + trainer (METHODS: SFTConfig + SFTTrainer, DPOConfig + DPOTrainer, KTO, ORPO /
CPO from TRL's experimental module, RewardConfig + RewardTrainer), run, and save the adapter. The only module that knows TRL/HF training argument names; the training loop itself is TRL's."""

from __future__ import annotations

import dataclasses
import difflib
import json
import shutil
import time
import typing
from pathlib import Path

from qtune.config import ONLINE_METHODS, Recipe, dump_recipe
from qtune.errors import QtuneError
from qtune.model import Launch
from qtune.rundir import RunDir, write_text_atomic

# Trainer-config arguments the schema already names (every method): setting them again in training.extra is
# ambiguous. A method's own named arguments are in its row of METHODS.
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
    "report_to": "tracking.backend",
    "run_name": "tracking.run_name",
    "push_to_hub": "hub.push",
    "hub_token": "hub (set HF_TOKEN in the environment)",
}


def _sft_settings(recipe: Recipe) -> dict:
    return {"packing": recipe.data.packing}


def _section_settings(recipe: Recipe) -> dict:
    """The method's own TRL config arguments, read from its recipe section through its row's `named` map (TRL
    argument → the recipe key that sets it), so one place says both what the recipe sets and where it comes from;
    then the few that are not one key's value (`DERIVED`)."""
    method = recipe.method
    section = getattr(recipe, method)
    prefix = f"{method}."
    settings = {
        arg: getattr(section, key.removeprefix(prefix))
        for arg, key in METHODS[method].named.items()
        if key.startswith(prefix) and key.removeprefix(prefix).isidentifier()
    }
    return settings | DERIVED.get(method, lambda _: {})(recipe)


def _reward_weights(recipe: Recipe) -> dict:
    return {"reward_weights": [r.weight for r in getattr(recipe, recipe.method).rewards]}  # in the rewards' order


# TRL arguments that are not one recipe key's value: DPO's loss types always as a list (one or a weighted mix),
# SimPO's fixed CPO loss, GRPO/RLOO's one weight per reward.
DERIVED: dict[str, typing.Callable[[Recipe], dict]] = {
    "dpo": lambda r: {"loss_type": list(r.dpo.loss_type if isinstance(r.dpo.loss_type, list) else [r.dpo.loss_type])},
    "simpo": lambda _: {"loss_type": "simpo"},
    "grpo": _reward_weights,
    "rloo": _reward_weights,
}


ONLINE_NAMED = {
    k: f"{{method}}.{k}" for k in ("num_generations", "max_completion_length", "temperature", "top_p", "beta")
} | {"reward_weights": "{method}.rewards[].weight", "use_vllm": "{method}.use_vllm"}


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method: its TRL config and trainer, the row schemas it trains on, and its config arguments."""

    config: str  # TRL config class (a name in trl, or module.Name under trl: experimental.orpo.ORPOConfig)
    trainer: str  # TRL trainer class (the same way)
    schemas: tuple[str, ...]  # row schemas (qtune.data.formats.FORMAT_SCHEMA values) it trains on
    named: dict[str, str]  # its own config arguments the recipe sets → the recipe key (for training.extra)
    settings: typing.Callable[[Recipe], dict]  # the recipe → those arguments
    reference: bool = False  # trains against a frozen reference model (the starting policy)
    generates: bool = True  # the result is a causal LM (False: a sequence-classification reward model)


METHODS = {
    "sft": Method(
        "SFTConfig",
        "SFTTrainer",
        ("messages", "prompt_completion", "text"),
        {"packing": "data.packing", "completion_only_loss": "data.train_on", "assistant_only_loss": "data.train_on"},
        _sft_settings,
    ),
    "dpo": Method(
        "DPOConfig",
        "DPOTrainer",
        ("preference",),
        {k: f"dpo.{k}" for k in ("beta", "loss_type", "loss_weights", "label_smoothing", "ld_alpha")}
        | {"precompute_ref_log_probs": "dpo.precompute_ref_log_probs"},
        _section_settings,
        reference=True,
    ),
    "kto": Method(
        "KTOConfig",
        "KTOTrainer",
        ("unpaired", "preference"),  # pairs are unpaired first (qtune.data.loading.rows_for_kto)
        {k: f"kto.{k}" for k in ("beta", "desirable_weight", "undesirable_weight", "loss_type")}
        | {"precompute_ref_log_probs": "kto.precompute_ref_log_probs"},
        _section_settings,
        reference=True,
    ),
    "orpo": Method(
        "experimental.orpo.ORPOConfig",
        "experimental.orpo.ORPOTrainer",
        ("preference",),
        {"beta": "orpo.beta"},
        _section_settings,
    ),
    "simpo": Method(
        "experimental.cpo.CPOConfig",
        "experimental.cpo.CPOTrainer",
        ("preference",),
        {"beta": "simpo.beta", "simpo_gamma": "simpo.gamma", "cpo_alpha": "simpo.cpo_alpha"}
        | {"label_smoothing": "simpo.label_smoothing", "loss_type": "method: simpo (CPO's loss_type simpo)"},
        _section_settings,
    ),
    "reward": Method(
        "RewardConfig",
        "RewardTrainer",
        ("preference",),
        {"center_rewards_coefficient": "reward.center_rewards_coefficient"},
        _section_settings,
        generates=False,
    ),
    "grpo": Method(
        "GRPOConfig",
        "GRPOTrainer",
        ("prompt_only",),
        {k: v.format(method="grpo") for k, v in ONLINE_NAMED.items()}
        | {"loss_type": "grpo.loss_type", "scale_rewards": "grpo.scale_rewards"},
        _section_settings,
    ),
    "rloo": Method(
        "RLOOConfig",
        "RLOOTrainer",
        ("prompt_only",),
        {k: v.format(method="rloo") for k, v in ONLINE_NAMED.items()},
        _section_settings,
    ),
}


def experimental(method: Method) -> str | None:
    """The TRL module that keeps the method's trainer when it is TRL's experimental one (ORPO, CPO/SimPO)."""
    module = method.trainer.rpartition(".")[0]
    return f"trl.{module}" if module.startswith("experimental") else None


def method_of(recipe: Recipe) -> Method:
    """The recipe's row of METHODS (config.py refuses the methods not in it)."""
    return METHODS[recipe.method]


PREFERENCE_DATA = {
    "preference": "preference pairs (prompt / chosen / rejected)",
    "unpaired": "unpaired rows (prompt / completion / label)",
}


def check_schema(recipe: Recipe, fmt: str, rows) -> None:
    """The rows are of a schema the recipe's method trains on (chats or text for sft, preference pairs for dpo, orpo
    and simpo, labelled completions or pairs for kto)."""
    method = method_of(recipe)
    if fmt in method.schemas:
        return
    sources = ", ".join(f"{r['source']} ({r['format']})" for r in getattr(rows, "sources", []))
    if "prompt_only" in method.schemas or fmt == "prompt_only":
        if fmt == "prompt_only":
            raise QtuneError(
                f"data.datasets: prompts alone (no completion) but method is {recipe.method}: {sources}",
                "set method: grpo or rloo to train on prompts with reward functions, or give completions",
            )
        raise QtuneError(
            f"data.datasets: method {recipe.method} generates its completions from prompts; the data maps to "
            f"{fmt}: {sources}",
            "give a 'prompt' column (text or messages ending with a user turn) or 'messages' ending with a user "
            "turn; other columns (e.g. 'answer') go to the reward functions",
        )
    if fmt in PREFERENCE_DATA:
        takers = " or ".join(name for name, m in METHODS.items() if fmt in m.schemas)
        other = (
            "SFT data (messages, alpaca, prompt/completion …)"
            if recipe.method == "sft"
            else "prompt + chosen + rejected pairs"
        )
        raise QtuneError(
            f"data.datasets: {PREFERENCE_DATA[fmt]} but method is {recipe.method}: {sources}",
            f"set method: {takers} to train on them, or give {other}",
        )
    unpaired = "; or prompt + completion + label (true / false) rows" if "unpaired" in method.schemas else ""
    raise QtuneError(
        f"data.datasets: method {recipe.method} trains on {' or '.join(method.schemas)} rows; the data maps to "
        f"{fmt}: {sources}",
        "give preference pairs: prompt + chosen + rejected (text or message lists), or chosen + rejected "
        f"conversations sharing their prompt{unpaired}; map other column names with the source's columns: "
        "{field: column}",
    )


def trl_class(name: str):
    """A TRL class by name: `KTOConfig` from trl, `experimental.orpo.ORPOConfig` from trl.experimental.orpo (TRL's
    own warning on importing its experimental module is silenced: qtune says it once, at the start of the run)."""
    import importlib
    import warnings

    module, _, cls = name.rpartition(".")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        return getattr(importlib.import_module(f"trl.{module}" if module else "trl"), cls)


def _accelerate_config(launch: Launch) -> str:
    """How the launch reads in accelerate config terms, for errors that must name both sides."""
    n = launch.world_size
    text = f"accelerate config: distributed_type {launch.distributed_type}, {n} process{'es' if n != 1 else ''}"
    if launch.distributed_type == "DEEPSPEED":
        text += f", zero_stage {launch.zero_stage if launch.zero_stage is not None else '?'}"
    if launch.distributed_type == "FSDP":
        text += f", fsdp_version {launch.fsdp_version or 1}"
    return text


def grad_accum_for(recipe: Recipe, launch: Launch) -> int:
    """Micro-batches per optimizer step: training.grad_accum, or derived from training.global_batch_size so the
    examples per optimizer step stay the same on any number of processes."""
    t = recipe.training
    if t.global_batch_size is None:
        return t.grad_accum
    per_pass = t.micro_batch_size * launch.world_size
    if t.global_batch_size % per_pass:
        lower = max(per_pass, t.global_batch_size // per_pass * per_pass)
        raise QtuneError(
            f"training.global_batch_size: {t.global_batch_size} examples per optimizer step do not split over "
            f"{launch.world_size} process(es) x training.micro_batch_size {t.micro_batch_size} = {per_pass} per "
            f"micro-step ({_accelerate_config(launch)})",
            f"make it a multiple of {per_pass} (e.g. {lower} or {lower + per_pass}), change "
            "training.micro_batch_size, or num_processes / num_machines in the accelerate config",
        )
    return t.global_batch_size // per_pass


def _check_sharded(recipe: Recipe, launch: Launch) -> None:
    """FSDP and DeepSpeed: what QLoRA needs there, refused before the model loads when it cannot work."""
    import os

    from qtune.quant import quant_storage, resolve_dtype

    q, engine = recipe.quantization, launch.distributed_type
    config = _accelerate_config(launch)
    if engine == "FSDP" and q.bits == 8:
        raise QtuneError(
            f"quantization.bits: 8 (LLM.int8) cannot be sharded by FSDP ({config}): bitsandbytes keeps int8 "
            "weights with separate row scales FSDP cannot flatten, and has no float storage for them",
            "use quantization.bits: 4 (FSDP-QLoRA, recipes/accelerate/fsdp.yaml), or keep 8-bit with DDP "
            "(recipes/accelerate/ddp.yaml)",
        )
    if launch.sharded and engine == "DEEPSPEED" and q.bits == 8:
        raise QtuneError(
            f"quantization.bits: 8 (LLM.int8) cannot be partitioned by DeepSpeed ZeRO-3 ({config})",
            "use quantization.bits: 4 under ZeRO-3 (recipes/accelerate/deepspeed-zero3.yaml), or keep 8-bit with "
            "ZeRO-2 (recipes/accelerate/deepspeed-zero2.yaml)",
        )
    if launch.sharded and q.bits == 4:
        param = resolve_dtype(recipe.model.dtype)
        storage = quant_storage(recipe, launch)
        if storage != param:
            name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
            raise QtuneError(
                f"quantization.quant_storage: {q.quant_storage} ({name(storage)}) differs from model.dtype "
                f"{recipe.model.dtype} ({name(param)}); {engine} shards each layer as one tensor of one dtype, so "
                f"the packed 4-bit weights must be stored in the param dtype ({config})",
                "remove quantization.quant_storage (qtune sets it to model.dtype under FSDP / ZeRO-3), or set it "
                "equal to model.dtype",
            )
    save_16bit = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "").lower()
    if launch.sharded and engine == "DEEPSPEED" and save_16bit == "false":
        raise QtuneError(
            f"DeepSpeed ZeRO-3 with zero3_save_16bit_model: false ({config}): the adapter could not be gathered "
            "from the partitions into a normal peft adapter at the end",
            "set zero3_save_16bit_model: true in the accelerate config (deepspeed_config), as "
            "recipes/accelerate/deepspeed-zero3.yaml does",
        )
    fixed = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "")
    if engine == "DEEPSPEED" and fixed.isdigit() and int(fixed) != grad_accum_for(recipe, launch):
        raise QtuneError(
            f"training.grad_accum: {grad_accum_for(recipe, launch)} but the accelerate config fixes "
            f"deepspeed_config.gradient_accumulation_steps: {fixed} ({config})",
            "set gradient_accumulation_steps: auto in the accelerate config (the recipe decides), or the same value",
        )
    if engine == "FSDP" and q.bits is not None and "8bit" in recipe.training.optimizer and recipe.training.save_steps:
        raise QtuneError(
            f"training.optimizer: {recipe.training.optimizer} fails when FSDP-QLoRA saves a checkpoint ({config}; "
            "peft's FSDP guide lists it as a known error)",
            "use paged_adamw_32bit or adamw_torch under FSDP, or set training.save_steps: null",
        )
    if engine == "FSDP" and not _accelerator_available():
        raise QtuneError(
            f"FSDP launch on a machine without a GPU ({config}): accelerate runs FSDP only on GPUs (on the CPU it "
            "trains plain DDP, sharding nothing), and fsdp_sync_module_states / fsdp_cpu_ram_efficient_loading "
            "need a GPU to broadcast from",
            "on the CPU launch DDP: accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2",
        )
    if engine == "DEEPSPEED":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise QtuneError(
                f"DeepSpeed launch ({config}) but deepspeed is not installed",
                "pip install 'qtune[deepspeed]' (needs CUDA), or launch with recipes/accelerate/ddp.yaml or fsdp.yaml",
            )


def _accelerator_available() -> bool:
    """A device accelerate can run FSDP on (its FSDP plugin needs one of these; the CPU is not among them)."""
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _extra(recipe: Recipe, key: str):
    return recipe.training.extra.get(key)


def _kto_kl(recipe: Recipe) -> bool:
    """KTO with a loss that estimates the KL term from neighbouring rows (every KTO loss but apo_zero_unpaired)."""
    return recipe.method == "kto" and recipe.kto.loss_type != "apo_zero_unpaired"


# Method × settings × launch combinations TRL cannot run, refused before any weight loads instead of failing inside
# the trainer: (methods, applies(recipe, launch), what, hint).
UNSUPPORTED = [
    (
        ("dpo", "kto"),
        lambda r, launch: bool(_extra(r, "sync_ref_model")),
        "training.extra.sync_ref_model: true with method {method}: TRL cannot sync the reference of a LoRA run (the "
        "reference is the frozen starting adapter on the same base, not a model of its own to update)",
        "remove sync_ref_model; to move the reference, train again with model.adapter set to this run",
    ),
    (
        ("dpo", "kto"),
        lambda r, launch: bool((_extra(r, "liger_kernel_config") or {}).get("fused_linear_cross_entropy")),
        "training.extra.liger_kernel_config.fused_linear_cross_entropy with method {method}: TRL's {trainer} patches "
        "the LM head itself and cannot use Liger's fused one",
        "remove fused_linear_cross_entropy from liger_kernel_config",
    ),
    (
        ("kto",),
        lambda r, launch: _kto_kl(r) and _extra(r, "train_sampling_strategy") not in (None, "sequential"),
        "training.extra.train_sampling_strategy: {strategy} with kto.loss_type {kto_loss}: the KL term pairs each "
        "row with its neighbours in a fixed-order batch, so TRL's KTOTrainer needs sequential sampling",
        "remove train_sampling_strategy (qtune keeps TRL's sequential default), or set kto.loss_type: "
        "apo_zero_unpaired",
    ),
]


def check_method_combination(recipe: Recipe, launch: Launch) -> None:
    """The recipe's method with its settings and this launch is one TRL can run (UNSUPPORTED)."""
    method = method_of(recipe)
    for methods, applies, what, hint in UNSUPPORTED:
        if recipe.method in methods and applies(recipe, launch):
            raise QtuneError(
                what.format(
                    method=recipe.method,
                    trainer=method.trainer.rpartition(".")[2],
                    strategy=_extra(recipe, "train_sampling_strategy"),
                    kto_loss=recipe.kto.loss_type if recipe.kto else None,
                )
                + f" ({_accelerate_config(launch)})",
                hint,
            )


def check_launch(recipe: Recipe, launch: Launch) -> None:
    """Launch topology × placement × quantization × checkpointing, before any model loads."""
    extra = recipe.training.extra
    if (launch.distributed or launch.distributed_type in ("FSDP", "DEEPSPEED")) and recipe.model.device_map == "auto":
        raise QtuneError(
            "model.device_map: auto spreads one process's model over its GPUs, but this launch is "
            f"{_accelerate_config(launch).removeprefix('accelerate config: ')} (the accelerate config's)",
            "drop model.device_map and model.max_memory under DDP / FSDP / DeepSpeed (one replica or shard per "
            "rank), or launch one process (recipes/accelerate/single-gpu.yaml, or plain `qtune train`)",
        )
    grad_accum_for(recipe, launch)
    if launch.distributed_type in ("FSDP", "DEEPSPEED"):
        _check_sharded(recipe, launch)
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
    if recipe.hub.push:  # the upload comes after training: its repo id, token and network switch are checked now
        from qtune.publish import check_push_after_training

        check_push_after_training(recipe.hub.repo_id, recipe.output_dir)


def reward_functions(recipe: Recipe) -> list:
    """The recipe's reward functions (grpo / rloo), each resolved (user code imported) and guarded
    (qtune.rewards.guarded), named as the recipe names them; a reference that cannot be used is one QtuneError."""
    from qtune import rewards

    section = getattr(recipe, recipe.method)
    functions = []
    for i, entry in enumerate(section.rewards):
        try:
            fn = rewards.resolve(entry.name, entry.options)
        except ValueError as exc:
            raise QtuneError(
                f"{recipe.method}.rewards.{i}: {exc}",
                "a reward is a built-in (accuracy, format, length) or path/to/file.py:name / package.module:name "
                "with TRL's signature f(prompts, completions, **kwargs) -> list[float]",
            ) from None
        functions.append(rewards.guarded(_reward_label(entry.name), fn, section.num_generations))
    labels = [f.__name__ for f in functions]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise QtuneError(
            f"{recipe.method}.rewards: {', '.join(twice)} listed twice (TRL logs each reward under its name)",
            "combine them into one entry, or give a user function another name",
        )
    return functions


def _reward_label(name: str) -> str:
    """The name a reward is logged under: a built-in's name, or a reference's function name."""
    return name.rpartition(":")[2]


def check_online(recipe: Recipe, launch: Launch) -> None:
    """grpo / rloo before any model loads: every reward resolves (user code imported), the generations per prompt
    divide the completions of an optimizer step, and vLLM, when asked, is installed and has a GPU."""
    import importlib.util

    section = getattr(recipe, recipe.method)
    reward_functions(recipe)
    per_step = recipe.training.micro_batch_size * grad_accum_for(recipe, launch) * launch.world_size
    g = section.num_generations
    if per_step % g:
        valid = [d for d in range(2, per_step + 1) if per_step % d == 0]
        nearest = sorted(valid, key=lambda d: (abs(d - g), d))[:2]
        micro = [m for m in range(1, 4 * g + 1) if (m * grad_accum_for(recipe, launch) * launch.world_size) % g == 0]
        raise QtuneError(
            f"{recipe.method}.num_generations: {g} completions per prompt do not divide the {per_step} completions "
            f"per optimizer step (training.micro_batch_size {recipe.training.micro_batch_size} x grad_accum "
            f"{grad_accum_for(recipe, launch)} x {launch.world_size} process(es)): a prompt's group would be split",
            (f"nearest valid num_generations: {' or '.join(map(str, sorted(nearest)))}" if nearest else "")
            + (f"; or training.micro_batch_size {micro[0]}" if micro else ""),
        )
    if section.use_vllm:
        if importlib.util.find_spec("vllm") is None:
            raise QtuneError(
                f"{recipe.method}.use_vllm: true but vllm is not installed",
                "pip install 'qtune[vllm]' (needs a CUDA GPU), or set use_vllm: false (transformers' generate)",
            )
        if not _accelerator_available():
            raise QtuneError(
                f"{recipe.method}.use_vllm: true on a machine without a GPU (vLLM generates on CUDA GPUs)",
                "set use_vllm: false: transformers' generate on the 4-bit base with the adapter works on the CPU",
            )


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
    if t.backend == "wandb":
        _check_wandb_login(recipe)
    if t.backend == "mlflow":
        from qtune.mlflow_tracking import check_installed

        check_installed()  # the store itself is checked by check_tracking (training only)
    return [t.backend]


def check_tracking(recipe: Recipe) -> None:
    """Before the model loads: the tracker can take the run (MLflow: its store writable, its server answering)."""
    if recipe.tracking.backend == "mlflow":
        from qtune import mlflow_tracking

        mlflow_tracking.check(recipe)


def _wandb_mode(recipe: Recipe) -> str:
    """The W&B mode this run gets: an explicit WANDB_MODE in the environment wins over the recipe."""
    import os

    return os.environ.get("WANDB_MODE") or recipe.tracking.mode


def _check_wandb_login(recipe: Recipe) -> None:
    """W&B online needs credentials; find out before the model loads, not at the first log step."""
    if _wandb_mode(recipe) != "online":
        return
    import wandb

    try:
        logged_in = wandb.login(prompt=False, verify=False)
    except wandb.errors.Error as exc:
        raise QtuneError(
            f"tracking.backend: wandb cannot log in: {str(exc).splitlines()[0]}",
            "fix WANDB_API_KEY (or run `wandb login`), or set tracking.mode: offline",
        ) from None
    if not logged_in:
        raise QtuneError(
            "tracking.backend: wandb (online) but this machine is not logged in to W&B",
            "run `wandb login` or set WANDB_API_KEY; or set tracking.mode: offline (sync later with "
            "`wandb sync`), or tracking.backend: none",
        )


def trainer_config(recipe: Recipe, launch: Launch, loss_settings: dict | None = None):
    """The trainer's config (the method's TRL config: SFTConfig, DPOConfig) for the recipe; `training.extra` passes
    further arguments through, checked by name."""
    import torch

    t = recipe.training
    method = method_of(recipe)
    config_class = trl_class(method.config)
    check_method_combination(recipe, launch)
    named = {**NAMED_BY_SCHEMA, **method.named}
    fields = {f.name for f in dataclasses.fields(config_class)}
    for key in t.extra:
        if key in named:
            raise QtuneError(
                f"training.extra.{key}: already set by the recipe key {named[key]}",
                f"set {named[key]} instead",
            )
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            suggestion = ""
            if close and close[0] in named:  # don't send the user on to the error above
                suggestion = f"did you mean '{close[0]}'? the recipe sets it as {named[close[0]]}; "
            elif close:
                suggestion = f"did you mean '{close[0]}'? "
            raise QtuneError(
                f"training.extra.{key}: {method.config} has no argument '{key}'",
                suggestion + f"see TRL's {method.config} / transformers' TrainingArguments",
            )
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    eval_on = recipe.data.eval_split is not None
    kwargs = dict(
        output_dir=str(RunDir(recipe.output_dir).checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=grad_accum_for(recipe, launch),
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
        report_to=_report_to(recipe),
        run_name=recipe.tracking.run_name,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False if launch.distributed else None,
        disable_tqdm=not launch.is_main,
        include_num_input_tokens_seen="non_padding",  # tokens/s in qtune.monitor counts real tokens
        logging_nan_inf_filter=False,  # a NaN loss must reach the logs (qtune.monitor.StopGuard stops on it)
        **{ckpt: t.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False}},
        **_precision(recipe),
        **method.settings(recipe),
        **(loss_settings or {}),
    )
    if recipe.method in ONLINE_METHODS:
        # TRL counts the prompt + generated tokens itself (state.num_input_tokens_seen); the generated batches carry
        # no input name transformers could count them by
        kwargs["include_num_input_tokens_seen"] = "no"
        kwargs.update(_online_eval(recipe))
    if "max_length" not in fields:  # GRPOConfig / RLOOConfig: prompts are not truncated, completions have their own
        kwargs.pop("max_length")
    kwargs.update(t.extra)
    _check_choice("training.optimizer", t.optimizer, "transformers.training_args", "OptimizerNames")
    _check_choice("training.scheduler", t.scheduler, "transformers.trainer_utils", "SchedulerType")
    try:
        return config_class(**kwargs)
    except (ValueError, TypeError) as exc:
        raise QtuneError(
            f"training: {method.config} refused the arguments: {str(exc).strip().splitlines()[0]}"
        ) from None


def _online_eval(recipe: Recipe) -> dict:
    """grpo / rloo with data.eval_split: evaluating generates (TRL's GRPO / RLOO evaluate sample num_generations
    completions of every held-out prompt and score them with the reward functions: eval_rewards/<name>/mean,
    eval_reward), so the held-out reward is measured before training (eval_on_start; run_training turns it off on
    --resume), at training.eval_steps only when the recipe sets them, and at the end (run_training). TRL's eval batch
    holds whole groups: micro_batch_size rounded up to a multiple of num_generations."""
    if recipe.data.eval_split is None:
        return {}
    t, g = recipe.training, getattr(recipe, recipe.method).num_generations
    return {
        "eval_strategy": "steps" if t.eval_steps else "no",
        "eval_steps": t.eval_steps,
        "eval_on_start": True,
        "per_device_eval_batch_size": -(-t.micro_batch_size // g) * g,
    }


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


def _adapter_fingerprint(model) -> str:
    """SHA-256 over the trainable weights' bytes: equal across ranks exactly when DDP kept replicas in sync."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _adapter_fingerprint_of(state_dict: dict) -> str:
    """The same fingerprint, over the LoRA entries of a gathered (FSDP / DeepSpeed) state dict."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(k for k in state_dict if "lora_" in k):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_gathered_adapter(peft_model, state_dict: dict, folder: Path, adapter: str = "default") -> None:
    """Write a gathered (FSDP / ZeRO-3) state dict's adapter as a normal peft adapter folder. peft 0.21's own
    save_pretrained(state_dict=…) finds the adapter's keys by walking the module tree, whose names carry
    `_fsdp_wrapped_module.` inside every auto-wrapped layer, so it matched none of the gathered (clean) keys and
    wrote an empty adapter (seen on a 2-rank CPU FSDP run); the keys are selected here by peft's naming instead."""
    from safetensors.torch import save_file

    marker, saved = f".{adapter}.", f".modules_to_save.{adapter}."  # LoRA weights; whole modules (reward: score)
    weights = {
        key.replace(saved, ".").replace(marker, "."): tensor.detach().to("cpu").contiguous()
        for key, tensor in state_dict.items()
        if ("lora_" in key and marker in key) or saved in key
    }
    if not weights:
        raise QtuneError("the gathered state dict holds no LoRA weights; the adapter was not saved")
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config[adapter].save_pretrained(str(folder))
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def _gathered_state_dict(trainer, launch: Launch) -> dict | None:
    """The full model state dict gathered from FSDP shards or DeepSpeed partitions (None when every rank holds
    a whole replica). Called on every rank; FSDP1 gives it on rank 0 only (rank0_only, offloaded to the CPU),
    whatever fsdp_state_dict_type the accelerate config sets for checkpoints."""
    if launch.distributed_type == "FSDP":
        return trainer.accelerator.get_state_dict(trainer.model)
    if launch.distributed_type == "DEEPSPEED" and launch.sharded:
        engine = trainer.model_wrapped
        # what Trainer.save_model does for peft under ZeRO-3: gather the trainable weights only
        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    return None


def _tracking_env(recipe: Recipe, run: RunDir) -> None:
    """transformers' tracker integrations read their settings from the environment; the recipe sets them."""
    import os

    t = recipe.tracking
    if t.backend == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.tensorboard)
    if t.backend == "mlflow":
        from qtune.mlflow_tracking import callback_env

        os.environ.update(callback_env(recipe))
    if t.backend != "wandb":
        return
    settings = {
        "WANDB_PROJECT": t.project,
        "WANDB_ENTITY": t.entity,
        "WANDB_RUN_GROUP": t.group,
        "WANDB_TAGS": ",".join(t.tags) if t.tags else None,
        "WANDB_MODE": t.mode if "WANDB_MODE" not in os.environ else None,  # an explicit env wins (e.g. disabled)
        # qtune logs the finished adapter folder itself (tracking.log_model); never the pickled checkpoints
        "WANDB_LOG_MODEL": "false",
    }
    os.environ.update({k: v for k, v in settings.items() if v})


def _start_wandb(recipe: Recipe, run: RunDir, launch: Launch, resuming: bool):
    """The W&B run, opened by qtune on the main process only, with the resolved recipe (secrets redacted)
    as its config; transformers' WandbCallback then logs into it and adds the trainer arguments. A resumed
    run continues the W&B run it started (its id kept in run_dir/wandb_run_id), a new run gets a new id."""
    import os

    from qtune.config import recipe_to_dict

    if recipe.tracking.backend != "wandb" or not launch.is_main:
        return None
    import wandb

    id_file = run.wandb_run_id
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
    t = recipe.tracking
    run = wandb.init(
        id=run_id,
        resume="allow" if run_id else None,
        project=t.project,
        entity=t.entity,
        name=t.run_name,
        group=t.group,
        tags=t.tags or None,
        config=recipe_to_dict(recipe),
        dir=os.environ.get("WANDB_DIR") or str(run.path),
    )
    id_file.write_text(run.id + "\n")
    return run


def keep_adapter_fp32(model) -> None:
    """TRL casts a quantized model's trainable LoRA weights to bf16 when SFTTrainer starts, but peft loads
    them back as fp32 when a checkpoint is resumed, so a resumed run would go on in another precision than an
    uninterrupted one (~1e-3 apart). Keep fp32 master weights from the start, peft's own default (and what
    fp16 mixed precision requires); bf16/fp16 autocast still runs the matmuls in half precision."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def check_free_space(run_dir: Path, trainable_params: int, recipe: Recipe) -> None:
    """Fail before training when the disk cannot hold the adapter and the checkpoints the recipe keeps
    (each: fp32 adapter + two AdamW moments, plus tokenizer files)."""
    probe = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    free = shutil.disk_usage(probe).free
    t = recipe.training
    kept = (t.save_total_limit or 3) if t.save_steps else 1  # 1: the checkpoint a SIGTERM saves
    need = kept * (12 * trainable_params + 32 * 2**20) + 4 * trainable_params + 32 * 2**20
    if free < need:
        raise QtuneError(
            f"output_dir: {probe} has {free / 2**30:.2f} GiB free; this run needs about {need / 2**30:.2f} GiB "
            f"(the adapter and {kept} checkpoint(s) of {trainable_params:,} trainable parameters)",
            "free some space, choose another output_dir, or lower training.save_total_limit",
        )


def _start_lines(recipe: Recipe, dataset, args, launch: Launch, checkpoint: str | None) -> list[tuple[str, str]]:
    """The run summary printed when training starts (qtune.monitor adds trainable params and steps)."""
    from qtune.quant import describe as describe_quantization

    lo, d = recipe.lora, recipe.data
    targets = lo.target_modules if isinstance(lo.target_modules, str) else ", ".join(lo.target_modules)
    sizes = f"{len(dataset['train']):,} train rows"
    if dataset.get("eval") is not None:
        sizes += f", {len(dataset['eval']):,} eval rows"
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * launch.world_size
    precision = "bf16 mixed" if args.bf16 else "fp16 mixed" if args.fp16 else "fp32"
    device = str(args.device)
    if args.device.type == "cuda":
        import torch

        device += f" ({torch.cuda.get_device_name(args.device)})"
    lines = [
        ("model", f"{recipe.model.name}, {describe_quantization(recipe)}"),
        (
            ("adapter", f"continues {recipe.model.adapter} (its own LoRA config)")
            if recipe.model.adapter
            else ("adapter", f"LoRA r {lo.r}, alpha {lo.alpha:g}, dropout {lo.dropout:g} on {targets}")
        ),
        ("data", f"{sizes}, max_length {d.max_length}, packing {'on' if d.packing else 'off'}")
        if recipe.method == "sft"
        else ("data", f"{sizes.replace('rows', _data_unit(recipe))}, max_length {d.max_length}"),
        *([("method", _method_line(recipe))] if recipe.method != "sft" else []),
        (
            "batch",
            f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x "
            f"{launch.world_size} process(es) = {per_step} examples per optimizer step",
        ),
        ("precision", f"{precision} (adapter weights fp32)"),
        ("devices", f"{device} x {launch.world_size} process(es) ({launch.distributed_type})"),
        ("output", str(recipe.output_dir) + (f" (resuming {Path(checkpoint).name})" if checkpoint else "")),
    ]
    if recipe.tracking.backend != "none":
        lines.append(("tracking", recipe.tracking.backend))
    return lines


def _data_unit(recipe: Recipe) -> str:
    if recipe.method in ONLINE_METHODS:
        return "prompts"
    return "labelled completions" if recipe.method == "kto" else "pairs"


def _method_line(recipe: Recipe) -> str:
    method = method_of(recipe)
    reference = (
        f"adapter {recipe.model.adapter} (frozen copy)"
        if recipe.model.adapter
        else "the base (the fresh adapter adds nothing)"
    )
    if recipe.method == "dpo":
        d = recipe.dpo
        losses = d.loss_type if isinstance(d.loss_type, list) else [d.loss_type]
        line = f"dpo, beta {d.beta:g}, loss {' + '.join(losses)}"
    elif recipe.method == "kto":
        k = recipe.kto
        line = (
            f"kto, beta {k.beta:g}, loss {k.loss_type}, weights desirable {k.desirable_weight:g} / undesirable "
            f"{k.undesirable_weight:g}"
        )
    elif recipe.method in ONLINE_METHODS:
        o = getattr(recipe, recipe.method)
        rewards = ", ".join(f"{_reward_label(r.name)} x {r.weight:g}" for r in o.rewards)
        line = (
            f"{recipe.method}, {o.num_generations} generations per prompt of up to {o.max_completion_length} tokens "
            f"(temperature {o.temperature:g}, top_p {o.top_p:g}, {'vLLM' if o.use_vllm else 'transformers generate'})"
            f", beta {o.beta:g}"
            + (f", loss {o.loss_type}" if recipe.method == "grpo" else "")
            + f"; rewards: {rewards}"
        )
        return line + ("; KL to the starting policy" if o.beta else "; no reference model")
    elif recipe.method == "orpo":
        line = f"orpo, beta (lambda) {recipe.orpo.beta:g}"
    elif recipe.method == "reward":
        c = recipe.reward.center_rewards_coefficient
        line = "reward, a score head (sequence classification, 1 label) + LoRA, Bradley-Terry loss" + (
            f", center_rewards_coefficient {c:g}" if c else ""
        )
    else:
        s = recipe.simpo
        line = f"simpo, beta {s.beta:g}, gamma {s.gamma:g}, cpo_alpha {s.cpo_alpha:g}"
    line += f"; reference: {reference}" if method.reference else "; no reference model"
    module = experimental(method)
    if module:
        line += f"; TRL keeps this trainer in its experimental module ({module}): its API may change between releases"
    return line


def _stopped_early(guard, trainer, run: RunDir) -> QtuneError:
    step, total = trainer.state.global_step, trainer.state.max_steps
    checkpoint = run.latest_checkpoint()
    if guard.bad:
        bad_step, what = guard.bad
        return QtuneError(
            f"training stopped at step {bad_step}/{total}: {what} is not a finite number; the adapter was not saved",
            f"last good checkpoint: {checkpoint or 'none (set training.save_steps to keep checkpoints)'}; "
            "lower training.lr or training.max_grad_norm or check the data, then --resume or start over",
        )
    return QtuneError(
        f"training stopped by {guard.signal_name} at step {step}/{total}; checkpoint saved: {checkpoint}",
        "continue with the same command plus --resume",
    )


def _final_eval(trainer) -> dict:
    """The eval figures of the last step: those logged at it already (training.eval_steps dividing the steps), else
    one evaluate() now (every rank takes part). Evaluating twice at one step costs a second pass and, for grpo / rloo
    (whose evaluation samples completions), would log a second, different figure for the same step."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") == step and "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return trainer.evaluate()


def _final_adapter_state(trainer, launch: Launch) -> tuple[dict | None, list]:
    """(gathered full state dict or None, adapter fingerprint per rank).

    FSDP / DeepSpeed: the adapter is gathered from the shards into one full state dict (every rank takes part)
    and fingerprinted once; sharded engines hold no replicas. DDP: each rank fingerprints its own replica and
    the fingerprints are gathered, so the summary shows whether the replicas stayed identical."""
    full_state = _gathered_state_dict(trainer, launch)
    if full_state is not None:
        return full_state, [_adapter_fingerprint_of(full_state) if launch.is_main else None]
    fingerprints = [_adapter_fingerprint(trainer.model)]
    if launch.distributed:
        import torch.distributed as dist

        gathered: list = [None] * launch.world_size
        dist.all_gather_object(gathered, fingerprints[0])
        fingerprints = gathered
    return None, fingerprints


def _save_adapter(
    trainer, tokenizer, run: RunDir, full_state: dict | None, stops: list[int], generates: bool = True
) -> Path:
    """Write adapter/ (safetensors + adapter_config.json + tokenizer + generation_config.json stopping at the
    run's stop tokens, no pickles) via a staging folder."""
    from qtune.stops import with_stops

    staging = run.path / "adapter.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if full_state is not None:
            save_gathered_adapter(unwrapped, full_state, staging)
        else:
            # only the trained adapter: a reference copy ("ref", dpo) is not part of the result
            unwrapped.save_pretrained(staging, safe_serialization=True, selected_adapters=["default"])
        tokenizer.save_pretrained(staging)
        if generates:  # a reward model scores text: nothing to stop
            base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            with_stops(getattr(base, "generation_config", None), stops, tokenizer).save_pretrained(staging)
        run.replace_adapter(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk leaves no adapter.tmp/ behind
        raise
    return run.adapter


def _summary(trainer, result, watcher, final_eval: dict, wall: float, launch: Launch, checkpoint, fingerprints) -> dict:
    """The figures of summary.json."""
    from qtune import monitor
    from qtune.model import base_fingerprint

    tokens = trainer.state.num_input_tokens_seen
    session_tokens = tokens - watcher.tokens_at_start
    return {
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "tokens": tokens,
        "train_loss": result.training_loss,
        "final_loss": watcher.final.get("loss"),
        "eval_loss": final_eval.get("eval_loss"),
        # preference methods, grpo / rloo: the reward figures of the last train log and of the final eval (model
        # card, W&B); grpo / rloo with an eval split: the held-out figures before training too (step 0)
        "rewards": _reward_figures({**watcher.final, **final_eval}),
        "rewards_before": _reward_figures(_eval_at(trainer, 0)),
        "wall_time_s": round(wall, 2),
        "tokens_per_s": round(session_tokens / wall, 2) if wall else None,
        "tokens_per_s_per_device": round(session_tokens / wall / launch.world_size, 2) if wall else None,
        "samples_per_s": result.metrics.get("train_samples_per_second"),
        **monitor.peak_memory(),
        "world_size": launch.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "backend": trainer.accelerator.state.backend,
        "adapter_fingerprint_per_rank": fingerprints,
        "base_fingerprint": base_fingerprint(watcher.recipe.model.name),  # merge checks the base is still it,
    }


def _reward_figures(record: dict) -> dict | None:
    """The reward figures of a log record: preference methods' rewards/…, grpo / rloo's rewards/<name>/mean and /std
    and the weighted total reward (eval_ prefixed for the held-out ones)."""
    totals = ("reward", "reward_std", "eval_reward", "eval_reward_std")
    return {k: v for k, v in record.items() if "rewards/" in k or k in totals} or None


def _eval_at(trainer, step: int) -> dict:
    """The eval figures logged at `step` (grpo / rloo: step 0 is the held-out reward before training)."""
    for entry in trainer.state.log_history:
        if entry.get("step") == step and "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return {}


def _report_final(tracker, summary: dict, recipe: Recipe, adapter_dir: Path) -> None:
    """Final figures into the W&B run summary; the adapter folder as a model artifact when asked."""
    tracker.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    if recipe.tracking.log_model:
        import wandb

        artifact = wandb.Artifact(f"{tracker.name or tracker.id}-adapter", type="model")
        artifact.add_dir(str(adapter_dir))
        tracker.log_artifact(artifact, aliases=["final"])


def build_trainer(prepared, model, dataset, callbacks=()):
    """The method's TRL trainer (SFTTrainer, DPOTrainer, KTOTrainer, ORPOTrainer, CPOTrainer) on the prepared run, the
    PeftModel and the dataset, with the adapter weights in fp32.

    Methods with a reference (dpo, kto): TRL holds the reference as a second, frozen adapter named "ref" on the same
    base, a copy of the starting adapter (model.adapter, or the fresh one, which adds nothing to the base); TRL
    copies it before casting the trainable adapter to bf16, so the trainable one is set back to that exact copy:
    at step 0 the policy is the reference, bit for bit."""
    method = method_of(prepared.recipe)
    kwargs = {"ref_model": None} if method.reference else {}
    training = {}  # the trainer, once built: samples.jsonl records its training generations, not evaluation's
    if prepared.recipe.method in ONLINE_METHODS:
        kwargs = {"reward_funcs": _recording(prepared, reward_functions(prepared.recipe), training)}
    trainer = trl_class(method.trainer)(
        model=model,
        args=prepared.args,
        train_dataset=dataset["train"],
        eval_dataset=dataset.get("eval"),
        processing_class=prepared.tokenizer,
        callbacks=list(callbacks),
        **kwargs,
    )
    training["trainer"] = trainer
    keep_adapter_fp32(trainer.model)
    if method.reference:
        _policy_from_reference(trainer.model)
    return trainer


def _recording(prepared, functions: list, training: dict) -> list:
    """The reward functions, the last of them also writing a few completions with every reward to samples.jsonl
    (on step 1 and every `samples_every` steps of training, not while evaluating: `training["trainer"]` is the
    trainer once built; main process only), and to the W&B run as a table when tracking.backend is wandb."""
    recipe = prepared.recipe
    section = getattr(recipe, recipe.method)
    if not section.samples_every or not prepared.launch.is_main:
        return functions
    path = prepared.run.samples
    seen: dict[str, list] = {}

    def wrap(fn, last: bool):
        def call(prompts, completions, **kwargs):
            values = fn(prompts, completions, **kwargs)
            trainer = training.get("trainer")
            if trainer is not None and not trainer.model.training:
                return values  # an evaluation's generations (held-out prompts): their figures are eval_rewards/…
            state = kwargs.get("trainer_state")
            step = state.global_step + 1 if state is not None else 0
            if step == 1 or step % section.samples_every == 0:
                seen[fn.__name__] = values
                if last:
                    records = _write_samples(path, step, prompts, completions, seen, section)
                    if recipe.tracking.backend == "wandb":
                        _log_samples_table(records)
            return values

        call.__name__ = call.__qualname__ = fn.__name__
        return call

    return [wrap(fn, i == len(functions) - 1) for i, fn in enumerate(functions)]


def _write_samples(path: Path, step: int, prompts, completions, values: dict, section) -> list[dict]:
    """Append `section.samples` completions with their prompts and rewards to samples.jsonl; returns the records."""
    from qtune.rewards import completion_text

    weights = {fn: entry.weight for fn, entry in zip(values, section.rewards, strict=False)}
    records = []
    with path.open("a", encoding="utf-8") as f:
        for i in range(min(section.samples, len(completions))):
            rewards = {name: v[i] for name, v in values.items()}
            record = {
                "step": step,
                "prompt": completion_text(prompts[i]) if isinstance(prompts[i], list) else prompts[i],
                "completion": completion_text(completions[i]),
                "rewards": rewards,
                "reward": sum(weights.get(name, 1.0) * v for name, v in rewards.items()),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            records.append(record)
    return records


def _log_samples_table(records: list[dict]) -> None:
    """The samples of one step as a W&B table (key `samples`: step, prompt, completion, each reward, the weighted
    total) in the run qtune opened, at that step's train/global_step (transformers' WandbCallback's step axis)."""
    import wandb

    if wandb.run is None or not records:
        return
    names = list(records[0]["rewards"])
    columns = ["step", "prompt", "completion", *names, "reward"]
    rows = [[r["step"], r["prompt"], r["completion"], *(r["rewards"][n] for n in names), r["reward"]] for r in records]
    wandb.run.log({"samples": wandb.Table(columns=columns, data=rows), "train/global_step": records[0]["step"]})


def _policy_from_reference(model) -> None:
    """The trainable adapter ("default") set to the frozen reference copy ("ref") TRL made of it."""
    import torch

    params = dict(model.named_parameters())
    if "ref" not in getattr(model, "peft_config", {}):
        raise QtuneError("internal: TRL made no reference adapter; the reference would not be the starting policy")
    with torch.no_grad():
        for name, param in params.items():
            if ".default." in name and param.requires_grad:
                param.copy_(params[name.replace(".default.", ".ref.")])


def run_training(prepared, model, dataset, quiet: bool = False) -> RunDir:
    """Train a prepared run (qtune.pipeline.PreparedRun) with the method's TRL trainer and save the adapter
    (safetensors, no pickles) into output_dir/adapter; metrics.jsonl, summary.json and loss.png beside it. `quiet`:
    log lines instead of a progress bar."""
    from accelerate import PartialState
    from transformers import PrinterCallback, ProgressCallback

    from qtune import monitor
    from qtune.stops import describe as describe_stops

    recipe, tokenizer, args, launch, run = (
        prepared.recipe,
        prepared.tokenizer,
        prepared.args,
        prepared.launch,
        prepared.run,
    )
    checkpoint = prepared.resume_from
    state = PartialState()
    _tracking_env(recipe, run)
    if launch.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.record_written(*RunDir.OUTPUTS)  # before any of them is written: --overwrite may remove them later
        dump_recipe(recipe, run.recipe_file)
    state.wait_for_everyone()

    guard = monitor.StopGuard()
    watcher = monitor.RunMonitor(
        recipe,
        run.metrics,
        launch.world_size,
        _start_lines(recipe, dataset, args, launch, checkpoint),
        step_logs=(run.samples,) if recipe.method in ONLINE_METHODS else (),
    )
    if launch.distributed_type == "DEEPSPEED":
        # The data check (qtune.data.preparation.check_training_data) already built a trainer, and with it
        # accelerate's state; accelerate refuses a DeepSpeed plugin on a second Accelerator, so start its state
        # afresh (the process group stays).
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    if checkpoint is not None:
        args.eval_on_start = False  # grpo / rloo: the held-out reward before training was measured by the first start
    trainer = build_trainer(prepared, model, dataset, callbacks=[guard])
    # The figures come first so every tracker's on_log sees them; qtune's console replaces the default one.
    trainer.callback_handler.callbacks.insert(0, watcher)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(monitor.Console(quiet=quiet))

    tracker = _start_wandb(recipe, run, launch, resuming=checkpoint is not None)
    ml_run = None
    if recipe.tracking.backend == "mlflow" and launch.is_main:
        from qtune.mlflow_tracking import MlflowRun

        ml_run = MlflowRun.start(recipe, run, resuming=checkpoint is not None)
    try:
        started = time.time()
        result = trainer.train(resume_from_checkpoint=checkpoint)
        wall = time.time() - started
        if guard.bad or guard.signal_name:
            if launch.is_main:
                monitor.plot_loss(run.metrics, run.loss_plot)
                monitor.plot_rewards(run.metrics, run.reward_plot)
                monitor.plot_reward_curve(run.metrics, run.reward_curve)
            raise _stopped_early(guard, trainer, run)

        final_eval = _final_eval(trainer) if dataset.get("eval") is not None else {}  # all ranks take part
        full_state, fingerprints = _final_adapter_state(trainer, launch)  # collectives: every rank
        if launch.is_main:
            stops = prepared.stop_tokens
            adapter_dir = _save_adapter(
                trainer, tokenizer, run, full_state, stops, generates=method_of(recipe).generates
            )
            summary = _summary(trainer, result, watcher, final_eval, wall, launch, checkpoint, fingerprints)
            summary["stop_tokens"] = describe_stops(tokenizer, stops)  # what generation stops at (qtune.stops)
            summary["replicas_identical"] = len(set(fingerprints)) == 1 if full_state is None else None
            write_text_atomic(run.summary_file, json.dumps(summary, indent=2) + "\n")
            plots = {
                run.loss_plot: monitor.plot_loss(run.metrics, run.loss_plot),
                run.reward_plot: monitor.plot_rewards(run.metrics, run.reward_plot),  # preference methods only
                run.reward_curve: monitor.plot_reward_curve(run.metrics, run.reward_curve),  # grpo / rloo only
            }
            plotted = [path.name for path, ok in plots.items() if ok]
            if tracker is not None:
                _report_final(tracker, summary, recipe, adapter_dir)
            if ml_run is not None:
                ml_run.report_final(summary, recipe, run)
            if summary["replicas_identical"] is False:
                print(f"qtune: warning: DDP replicas diverged: adapter fingerprints {fingerprints}", flush=True)
            _print_done(summary, run, plotted, tracker, recipe, ml_run)
    except BaseException as exc:
        if tracker is not None:
            tracker.finish(exit_code=1)
        if ml_run is not None:
            ml_run.end("KILLED" if guard.signal_name or isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if tracker is not None:
        tracker.finish()
    if ml_run is not None:
        ml_run.end()
    state.wait_for_everyone()
    if recipe.hub.push and launch.is_main:  # after every rank is done: a failed upload leaves the adapter saved
        from qtune.publish import push_after_training

        push_after_training(run.path, recipe.hub.repo_id, private=recipe.hub.private)
    return run


def _print_done(summary: dict, run: RunDir, plotted: list[str], tracker, recipe: Recipe, ml_run=None) -> None:
    """Where everything is, and the next command to run."""
    import shlex

    quoted = shlex.quote(str(run.path))
    print(f"qtune: adapter saved to {run.adapter} ({summary['steps']} steps, {summary['wall_time_s']:.1f}s)")
    figures = []
    if summary["final_loss"] is not None:
        figures.append(f"final loss {summary['final_loss']:.4f}")
    if summary["eval_loss"] is not None:
        figures.append(f"eval loss {summary['eval_loss']:.4f}")
    before, after = (summary.get(k) or {} for k in ("rewards_before", "rewards"))
    if "eval_reward" in after:
        figures.append(
            "held-out reward "
            + (f"{before['eval_reward']:.3f} before training -> " if "eval_reward" in before else "")
            + f"{after['eval_reward']:.3f}"
        )
    if summary["tokens_per_s"]:
        figures.append(f"{summary['tokens_per_s']:,.0f} tokens/s")
    if "peak_mem_gb" in summary:
        figures.append(f"GPU peak {summary['peak_mem_gb']:.2f} GB")
    elif "peak_rss_gb" in summary:
        figures.append(f"RSS peak {summary['peak_rss_gb']:.2f} GB")
    if figures:
        print("qtune: " + ", ".join(figures))
    files = [run.recipe_file.name, run.summary_file.name, run.metrics.name] + plotted
    if run.samples.is_file():
        files.append(run.samples.name)
    if run.checkpoints.is_dir():
        files.append(run.checkpoints.name + "/")
    print(f"  run dir      {run.path}: {', '.join(files)}")
    if tracker is not None:
        if tracker.settings._offline:
            print(f"  W&B          offline; upload with: wandb sync {shlex.quote(str(tracker.settings.sync_dir))}")
        else:
            print(f"  W&B          {tracker.url}")
    if recipe.tracking.backend == "tensorboard":
        print(f"  TensorBoard  tensorboard --logdir {shlex.quote(str(run.tensorboard))}")
    for line in ml_run.where() if ml_run is not None else []:
        print(line)
    print("next:")
    if not method_of(recipe).generates:
        print(
            f"  score text with {run.adapter} on {recipe.model.name}: AutoModelForSequenceClassification (num_labels=1) +"
        )
        print(
            "  PeftModel.from_pretrained (README: Reward models); qtune chat / merge / export-gguf refuse a reward run",
            flush=True,
        )
        return
    print(f"  qtune chat {quoted}     # talk to the fine-tuned model")
    print(f"  qtune merge {quoted}    # merge the adapter into the base for serving", flush=True)
