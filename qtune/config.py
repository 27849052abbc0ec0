"""The recipe: one typed, documented schema, loaded from YAML with `key.sub=value` overrides.

Every error names the file, the key path and (where the YAML parser gives one) the line. This module
must not import torch or transformers: `qtune --help` and recipe validation stay instant.
"""

from __future__ import annotations

import difflib
import math
import os
import posixpath
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from qtune.errors import QtuneError
from qtune.quant import BACKENDS, offered_bits

Dtype = Literal["auto", "bfloat16", "float16", "float32"]


SECRET_WORDS = ("token", "key", "secret", "password")  # recipe keys redacted wherever a recipe is written


def mlflow_name_ok(name: str) -> bool:
    """MLflow's rule for param, metric and tag names (mlflow.utils.validation): these characters, up to 250 of them,
    and no name a path normalisation would change (they may be stored as files)."""
    norm = posixpath.normpath(name)
    return bool(re.fullmatch(r"[\w\-. :/]{1,250}", name)) and norm == name and not norm.startswith(("/", ".."))


# Upper bounds that keep a value inside what the libraries downstream can hold (a 400-digit step count is a
# typo, not a plan, and would end in an OverflowError deep inside transformers after the model loaded).
INT32_MAX = 2**31 - 1


def _leaf_types(annotation: Any) -> list:
    """The alternatives of a field's type, unions and Optional flattened (None left out)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaf_types(arg)]
    return [] if annotation is type(None) else [annotation]


def _no_bool_number_mixup(cls: type[BaseModel], v: Any, info: ValidationInfo) -> Any:
    """pydantic's lax mode reads `true` in a number field as 1, and 1 or "yes" in a boolean field as true: in a
    recipe each is a slip (lora.r: true), so both are refused, as the recipe's JSON Schema (`qtune schema`) does."""
    field = cls.model_fields.get(info.field_name or "")
    if field is None or v is None:
        return v
    leaves = _leaf_types(field.annotation)
    numbers = [leaf for leaf in leaves if leaf in (int, float)]
    items = [typing.get_args(leaf)[0] for leaf in leaves if typing.get_origin(leaf) is list and typing.get_args(leaf)]
    if isinstance(v, bool) and numbers and bool not in leaves:
        raise ValueError("must be a number, not true or false")
    if isinstance(v, list) and any(isinstance(x, bool) for x in v) and {int, float} & set(items):
        raise ValueError("must be a list of numbers, not true or false")
    if bool in leaves and not isinstance(v, bool):
        words = [a for leaf in leaves if typing.get_origin(leaf) is Literal for a in typing.get_args(leaf)]
        if v not in words:
            raise ValueError(
                f"must be true, false or {' or '.join(map(str, words))}" if words else "must be true or false"
            )
    return v


class Section(BaseModel):
    # allow_inf_nan=False: inf / nan (YAML .inf, .nan, 1e999) pass `gt=0` and would fail only after the model loads.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    _bool_number = field_validator("*", mode="before")(classmethod(_no_bool_number_mixup))


def _local_path(value: str) -> str:
    """A path as every library must get it: `~` expanded once, here (hub ids never start with `~`)."""
    if not value.strip():
        raise ValueError("must not be empty")
    if value.startswith("~"):
        expanded = os.path.expanduser(value)
        if expanded.startswith("~"):
            raise ValueError(
                f"cannot expand {value.split('/', 1)[0]} (no such user, or HOME is unset); give the full path"
            )
        return expanded
    return value


class ModelSection(Section):
    """Which base model to load and where to put it."""

    name: str = Field(description="Hub id (meta-llama/Llama-2-7b-hf) or a local folder.")
    revision: str | None = Field(None, description="Hub branch, tag or commit.")
    tokenizer: str | None = Field(None, description="Tokenizer hub id or folder; defaults to `name`.")
    dtype: Dtype = Field(
        "auto",
        description="Dtype of the parts that stay unquantized (embeddings, norms, lm_head). "
        "auto: bfloat16 on a GPU that supports it, else float32.",
    )
    attn_implementation: str | None = Field(
        None, description="sdpa, eager, flash_attention_2, flex_attention; null = transformers' default."
    )
    device_map: Literal["auto"] | None = Field(
        None,
        description="auto: spread one process's model over all its GPUs (big models, no DDP). "
        "null: placement follows the launch (one GPU, one replica per rank, or the CPU).",
    )
    max_memory: dict[str, str] | None = Field(
        None, description='Per-device cap for device_map auto, e.g. {"0": "20GiB", "1": "20GiB", "cpu": "60GiB"}.'
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub repo. Off unless you trust it.")
    adapter: str | None = Field(
        None,
        description="Start from a trained LoRA adapter instead of a fresh one: a qtune run dir (its adapter/), an "
        "adapter folder (adapter_config.json) or a Hub id. Its own LoRA config is used (the lora section is not). "
        "For dpo and kto the reference model is this starting adapter, held frozen beside it on the same base.",
    )

    @field_validator("name", "tokenizer", "adapter")
    @classmethod
    def _expand_user(cls, v: str | None) -> str | None:
        return None if v is None else _local_path(v)

    @model_validator(mode="after")
    def _max_memory_needs_device_map(self) -> ModelSection:
        if self.max_memory and self.device_map != "auto":
            raise ValueError("max_memory only applies with device_map: auto")
        return self


class QuantizationSection(Section):
    """How the frozen base weights are stored (bitsandbytes by default, or another backend)."""

    backend: Literal[tuple(BACKENDS)] = Field(
        "bnb", description="Quantization library: " + "; ".join(b.doc for b in BACKENDS.values()) + "."
    )
    bits: Literal[4, 8] | None = Field(4, description="4 (QLoRA), 8 (LLM.int8) or null (plain LoRA, no quantization).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 is the QLoRA paper's.")
    double_quant: bool = Field(True, description="Quantize the 4-bit absmax constants too (~0.37 bit/param saved).")
    compute_dtype: Dtype = Field("auto", description="Dtype the 4-bit weights are dequantized to for matmuls.")
    quant_storage: Dtype | None = Field(
        None, description="Storage dtype of packed 4-bit weights; FSDP needs it equal to the param dtype."
    )

    @model_validator(mode="after")
    def _backend_offers_bits(self) -> QuantizationSection:
        backend = BACKENDS[self.backend]
        offered = offered_bits(backend)
        if self.bits is None and None not in backend.bits:
            plain = " or ".join(b.name for b in BACKENDS.values() if None in b.bits)
            raise ValueError(
                f"quantization.backend {self.backend} needs quantization.bits ({' or '.join(map(str, offered))}); "
                f"bits: null means no quantization (leave backend at {plain})"
            )
        if self.bits not in backend.bits:
            raise ValueError(
                f"quantization.backend {self.backend} does not offer quantization.bits {self.bits} for LoRA training "
                "here; "
                f"it offers: {', '.join(map(str, offered))}"
            )
        # Values other than the defaults (a resolved recipe.yaml writes the defaults back, so they must pass).
        unread = [
            k
            for k, default in (("quant_type", "nf4"), ("quant_storage", None))
            if getattr(self, k) != default and k not in backend.keys
        ]
        if unread:
            readers = [b for b in BACKENDS.values() if all(k in b.keys for k in unread)]
            raise ValueError(
                f"quantization.{', quantization.'.join(unread)} only apply to "
                f"{' or '.join(f'backend {b.name} ({b.library})' for b in readers)}, "
                f"not quantization.backend {self.backend}"
            )
        return self


class LoraSection(Section):
    """The trainable low-rank adapter (peft LoraConfig)."""

    r: int = Field(16, gt=0, le=65536, description="Rank of the update matrices.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (q_proj, v_proj …) or all-linear (every linear but lm_head)."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: list[str] | None = Field(None, description="Modules trained in full and saved with the adapter.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("give at least one module name, or all-linear")
        return v


class DatasetSource(Section):
    """One training data source: a local file or folder, or a Hub dataset."""

    path: str = Field(
        description="A local file (.jsonl, .json, .csv, .parquet, .txt), a folder of such files or one written by "
        "save_to_disk, or a Hub dataset name (org/name)."
    )
    format: Literal[
        "auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference", "unpaired", "prompt"
    ] = Field(
        "auto",
        description="alpaca: instruction/input/output; sharegpt: conversations of from/value; messages: "
        "OpenAI-style role/content chat; prompt_completion: prompt + completion; text: plain text (continued "
        "pre-training); preference (dpo, orpo, simpo, kto): prompt + chosen + rejected as text or message lists, or "
        "chosen + rejected as whole conversations sharing the prompt; unpaired (kto): prompt + completion + label "
        "(true: desirable, false: undesirable); prompt (grpo, rloo): a prompt alone (text or messages ending with a "
        "user turn, or a messages column ending with one), its other columns passed to the reward functions; "
        "auto: detected from the columns.",
    )
    columns: dict[str, str] | None = Field(
        None,
        description="Map the format's fields to this source's column names, e.g. {instruction: question, "
        "output: answer} or {prompt: q, completion: a}.",
    )
    roles: dict[str, str] | None = Field(
        None,
        description="sharegpt: extra 'from' names mapped to roles (user, assistant, system, tool), added to "
        "human/gpt/…",
    )
    name: str | None = Field(None, description="Dataset configuration (subset) name, for Hub or folder datasets.")
    split: str = Field("train", description="Split to train on.")
    revision: str | None = Field(None, description="Hub branch, tag or commit.")
    # The mixed rows are held in memory: the caps keep a typo from asking for billions of them.
    samples: int | None = Field(
        None, gt=0, le=100_000_000, description="Take exactly this many rows (repeating the source if it has fewer)."
    )
    weight: float | None = Field(
        None, gt=0, le=1000, description="Take this multiple of the source's rows (0.5 = half, 2 = twice over)."
    )

    @field_validator("path")
    @classmethod
    def _expand_user(cls, v: str) -> str:
        return _local_path(v)

    @model_validator(mode="after")
    def _one_amount(self) -> DatasetSource:
        if self.samples is not None and self.weight is not None:
            raise ValueError("give samples or weight, not both")
        return self


class DataSection(Section):
    """What the model learns from."""

    datasets: list[DatasetSource] = Field(
        min_length=1, description="Data sources, mixed (per samples/weight) and shuffled by training.seed."
    )
    max_length: int = Field(2048, gt=0, le=2**24, description="Longest tokenized example; longer ones are truncated.")
    packing: bool = Field(
        False, description="Pack several examples into each row (TRL packing, padding-free position ids)."
    )
    train_on: Literal["completions", "last", "all"] = Field(
        "completions",
        description="completions: loss on every answer (each assistant turn and its end-of-turn); last: on the "
        "last answer of each chat only; all: loss on every token.",
    )
    chat_template: str | None = Field(
        None,
        description="null: the tokenizer's own; a built-in, the released template of the model it is named "
        "after (llama-3, llama-3.1, llama-3.2, qwen2.5, phi-3, phi-3.5, gemma, mistral-v0.1, mistral-v0.2, "
        "mistral-v0.3, chatml); or a Jinja template string.",
    )
    eval_split: float | str | None = Field(
        None,
        description="A fraction of the rows held out for eval loss, or the name of a split every source has "
        "(null: no eval). grpo / rloo: held-out prompts whose mean reward (per function and total) is measured "
        "before training, at training.eval_steps if set, and at the end.",
    )
    dedup: bool = Field(False, description="Drop exact duplicate rows (after format mapping).")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first bad row (file and row named); skip: drop it, counted."
    )
    max_untrained_share: float = Field(
        0.05, ge=0, le=1, description="Fail when more than this share of examples has no trained token."
    )
    num_proc: int | None = Field(None, gt=0, le=1024, description="Processes for tokenizing (datasets num_proc).")

    @field_validator("eval_split", mode="before")
    @classmethod
    def _fraction_or_name(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:  # YAML 1.1 reads 1e-1 (no dot) as a string: it is still a fraction, not a split's name
                v = float(v)
            except ValueError:
                return v
        if isinstance(v, bool):
            raise ValueError("give a fraction between 0 and 1 (exclusive) or a split name")
        if isinstance(v, int | float) and not (math.isfinite(v) and 0 < v < 1):
            raise ValueError("a fraction must be between 0 and 1 (exclusive), or give a split name")
        return v


class TrainingSection(Section):
    """The optimisation (TRL SFTConfig)."""

    epochs: float = Field(1, gt=0, le=10_000, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, le=INT32_MAX, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(4, gt=0, le=65536, description="Examples per device per forward pass.")
    grad_accum: int = Field(4, gt=0, le=65536, description="Micro-batches per optimizer step.")
    global_batch_size: int | None = Field(
        None,
        gt=0,
        le=INT32_MAX,
        description="Examples per optimizer step over all processes, the same whatever the launch: replaces grad_accum "
        "with global_batch_size / (micro_batch_size x processes), which must divide evenly. null: grad_accum "
        "as given (the step then grows with the number of processes).",
    )
    lr: float = Field(
        2e-4,
        gt=0,
        description="Peak learning rate (2e-4 or 2.0e-4); any finite positive number (a huge one forces divergence in tests).",
    )
    scheduler: str = Field("cosine", description="transformers SchedulerType: linear, cosine, constant …")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of the steps spent warming up.")
    optimizer: str = Field(
        "adamw_torch", description="transformers OptimizerNames: adamw_torch, paged_adamw_32bit, paged_adamw_8bit …"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapter weights.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping (0.3 as in the QLoRA paper).")
    gradient_checkpointing: bool = Field(True, description="Recompute activations (non-reentrant) to save memory.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision; auto: bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on CPU."
    )
    logging_steps: int = Field(10, gt=0, le=INT32_MAX, description="Log loss, lr and grad norm every N steps.")
    eval_steps: int | None = Field(
        None, gt=0, le=INT32_MAX, description="Evaluate every N steps (needs data.eval_split)."
    )
    save_steps: int | None = Field(
        None, gt=0, le=INT32_MAX, description="Checkpoint every N steps (null: no mid-run checkpoints)."
    )
    save_total_limit: int | None = Field(2, gt=0, le=INT32_MAX, description="Keep at most this many checkpoints.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for weights init, data order and dropout.")
    resume: bool | Literal["auto"] = Field(
        False,
        description="true: continue from the latest checkpoint in output_dir/checkpoints; "
        "auto: continue if there is one, else start (for jobs that get restarted).",
    )
    overwrite: bool = Field(False, description="Replace an earlier run's outputs in output_dir.")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Any further SFTConfig argument, passed through (checked by name)."
    )


class TrackingSection(Section):
    """Experiment tracking (credentials come from the environment: WANDB_API_KEY, MLFLOW_TRACKING_TOKEN or
    MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD; never from a recipe)."""

    backend: Literal["wandb", "tensorboard", "mlflow", "none"] = Field(
        "none", description="Where metrics go besides the console."
    )
    uri: str | None = Field(
        None,
        description="MLflow tracking URI: http(s)://server:port, databricks, sqlite:///file.db, or a folder (MLflow's "
        "file store). null: MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the directory qtune runs from "
        "(artifacts in ./mlruns), as MLflow itself does.",
    )
    project: str = Field("qtune", description="W&B project; MLflow experiment.")
    run_name: str | None = Field(None, description="Run name shown by the tracker (W&B, MLflow).")
    entity: str | None = Field(None, description="W&B team or user.")
    tags: list[str] = Field(
        default_factory=list, description="W&B tags; MLflow: one run tag each, `key=value` gives it a value."
    )
    group: str | None = Field(None, description="W&B run group.")
    mode: Literal["online", "offline"] = Field(
        "online", description="W&B mode; offline writes output_dir/wandb for `wandb sync`."
    )
    log_model: bool = Field(
        False,
        description="Upload the final adapter folder: to W&B as a model artifact, to MLflow as the run's adapter/ "
        "artifacts.",
    )

    @field_validator("uri")
    @classmethod
    def _no_credentials_in_uri(cls, v: str | None) -> str | None:
        """A recipe is written into the run dir and the tracker's params: a password in the URI would be too."""
        from urllib.parse import parse_qsl, urlsplit

        if v is None:
            return v
        if not v.strip():
            raise ValueError("must not be empty (null: MLflow's default)")
        parts = urlsplit(v)
        secret_query = [k for k, _ in parse_qsl(parts.query) if any(w in k.lower() for w in SECRET_WORDS)]
        if "@" in parts.netloc or secret_query:
            raise ValueError(
                "credentials in the URI would be written to recipe.yaml and the run's params: remove them and set "
                "MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, in the environment"
            )
        return v

    @model_validator(mode="after")
    def _keys_of_the_backend(self) -> TrackingSection:
        # Values other than the defaults only (a resolved recipe.yaml writes the defaults back, so they must pass).
        if self.uri is not None and self.backend not in ("mlflow", "none"):  # none: tracking switched off
            raise ValueError(f"tracking.uri is MLflow's; backend is {self.backend}: set backend: mlflow or remove uri")
        if self.backend == "mlflow":
            unread = [
                k
                for k, default in (("entity", None), ("group", None), ("mode", "online"))
                if getattr(self, k) != default
            ]
            if unread:
                raise ValueError(
                    f"tracking.{unread[0]} is a W&B setting; MLflow has none (backend: mlflow): remove it"
                    + (
                        " (MLflow logs to tracking.uri; a local sqlite:/// file works offline)"
                        if unread[0] == "mode"
                        else ""
                    )
                )
            for i, tag in enumerate(self.tags):
                key = tag.split("=", 1)[0]
                if not mlflow_name_ok(key):
                    raise ValueError(
                        f"tracking.tags.{i}: '{key}' is not an MLflow tag name (letters, digits, _ - . : / and "
                        "spaces, up to 250 characters; no leading /, no // or trailing /)"
                    )
        return self


class HubSection(Section):
    """Publishing to the Hugging Face Hub (the token comes from HF_TOKEN or `hf auth login`, never a recipe)."""

    push: bool = Field(
        False,
        description="Upload the adapter and a model card when training ends, as `qtune push` does; repo id "
        "and token are checked before the model loads, and a failed upload keeps the adapter and prints the retry.",
    )
    repo_id: str | None = Field(None, description="Hub repo, ORG/NAME.")
    private: bool = Field(True, description="Create the repo private.")


# The training methods of issue #16. One key picks the method; its settings live in a section of the same name.
METHODS = ("sft", "dpo", "kto", "orpo", "simpo", "reward", "grpo", "rloo")
# Methods that generate their own completions from prompt-only data and score them with reward functions (issue #17).
ONLINE_METHODS = ("grpo", "rloo")
# DPO's loss types as TRL 1.16 DPOConfig.loss_type offers them (tests/test_dpo.py checks the list against TRL's).
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
DpoLoss = Literal[DPO_LOSS_TYPES]


class DpoSection(Section):
    """Direct Preference Optimization (TRL DPOConfig); used with `method: dpo`."""

    beta: float = Field(
        0.1, gt=0, le=1000, description="Strength of the pull towards the reference model (higher: stay closer)."
    )
    loss_type: DpoLoss | list[DpoLoss] = Field(
        "sigmoid",
        description="TRL's DPO loss: sigmoid (DPO), ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot, "
        "aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft; or a list combined with loss_weights, e.g. "
        "[sigmoid, sft] (RPO).",
    )
    loss_weights: list[float] | None = Field(
        None, description="One weight per loss_type entry when several are combined (null: 1.0 each)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Probability a preference label is flipped (robust); epsilon for exo_pair."
    )
    ld_alpha: float | None = Field(
        None, ge=0, le=1, description="LD-DPO weight of the completion tokens beyond the shorter one (null: off)."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference log-probs once before training (one less forward per step)."
    )

    @field_validator("loss_type")
    @classmethod
    def _loss_list(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one loss type")
            if len(set(v)) != len(v):
                raise ValueError("a loss type is listed twice")
        return v

    @model_validator(mode="after")
    def _weights_match(self) -> DpoSection:
        losses = self.loss_type if isinstance(self.loss_type, list) else [self.loss_type]
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} weight(s) for {len(losses)} loss type(s) "
                f"({', '.join(losses)}): give one per loss type"
            )
        if "exo_pair" in losses and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        return self


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")  # TRL 1.16 KTOConfig.loss_type choices (tests/test_kto.py checks)


class KtoSection(Section):
    """Kahneman-Tversky Optimization (TRL KTOConfig); used with `method: kto`."""

    beta: float = Field(
        0.1, gt=0, le=1000, description="Strength of the pull towards the reference model (higher: stay closer)."
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="Weight of the desirable (label true) examples' loss; raise it when they are "
        "fewer (the KTO paper: desirable_weight x desirable ≈ 1 to 1.33 x undesirable_weight x undesirable).",
    )
    undesirable_weight: float = Field(
        1.0, gt=0, le=1000, description="Weight of the undesirable (label false) examples' loss."
    )
    loss_type: Literal[KTO_LOSS_TYPES] = Field(
        "kto",
        description="kto (the KTO paper; estimates the KL term from mismatched completions in each micro-batch, so "
        "training.micro_batch_size must be 2 or more) or apo_zero_unpaired (APO-zero, unpaired).",
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference log-probs once before training (one less forward per step)."
    )


class OrpoSection(Section):
    """Odds Ratio Preference Optimization (TRL's experimental ORPOConfig); used with `method: orpo`. No reference."""

    beta: float = Field(
        0.1,
        gt=0,
        le=1000,
        description="λ: weight of the odds-ratio term added to the chosen answer's NLL (the "
        "ORPO paper uses 0.1 to 0.25).",
    )


class SimpoSection(Section):
    """Simple Preference Optimization (TRL's experimental CPOConfig, loss_type simpo); used with `method: simpo`.
    No reference: the reward is the length-normalised log-probability."""

    beta: float = Field(
        2.0, gt=0, le=1000, description="Scale of the length-normalised reward (the SimPO paper: 2.0 to 2.5)."
    )
    gamma: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="Target reward margin between chosen and rejected (TRL's simpo_gamma; the "
        "paper sets gamma / beta ≈ 0.5).",
    )
    cpo_alpha: float = Field(
        0.0, ge=0, le=1000, description="Weight of an NLL term on the chosen answer: 0 is SimPO, > 0 CPO-SimPO."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Probability a preference label is flipped (conservative loss)."
    )


class RewardSection(Section):
    """Reward modelling (TRL RewardConfig): a sequence-classification head (score) + LoRA on the base, trained so
    the chosen answer scores above the rejected one (Bradley-Terry loss); used with `method: reward`."""

    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="Weight of a penalty on the mean squared score, keeping the rewards centred on zero (Eisenstein "
        "et al. 2023; TRL recommends 0.01; null: off).",
    )


# GRPO's loss types as TRL 1.16 GRPOConfig.loss_type offers them (tests/test_grpo.py checks the list against TRL's).
GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")


class RewardEntry(BaseModel):
    """One reward function: a built-in's name with its options, or a user function by reference."""

    # extra="allow": a built-in's options sit beside name and weight (checked by qtune.rewards, strictly)
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    name: str = Field(
        description="A built-in (accuracy, format, length) or a function: path/to/rewards.py:name or "
        "package.module:name, with TRL's signature f(prompts, completions, **columns) -> list[float]."
    )
    weight: float = Field(1.0, ge=-1000, le=1000, description="The reward's weight in the sum (TRL reward_weights).")

    _bool_number = field_validator("*", mode="before")(classmethod(_no_bool_number_mixup))

    @model_validator(mode="after")
    def _known(self) -> RewardEntry:
        from qtune import rewards

        if rewards.is_reference(self.name):  # imported by the recipe check (qtune.pipeline.prepare), not here
            target, _, attr = self.name.rpartition(":")
            if not target or not attr.isidentifier():
                raise ValueError(
                    f"reward reference '{self.name}' is not path/to/file.py:function or package.module:function"
                )
            if self.model_extra:
                raise ValueError(
                    f"reward {self.name} is a user function: options ({', '.join(self.model_extra)}) are for "
                    "built-ins only; read settings inside the function"
                )
        else:
            rewards.resolve(self.name, self.model_extra)  # built-ins: name and options checked (pure Python)
        return self

    @property
    def options(self) -> dict:
        return dict(self.model_extra or {})


class _OnlineSection(Section):
    """What grpo and rloo share: generation and rewards."""

    num_generations: int = Field(
        8,
        ge=2,
        le=4096,
        description="Completions generated per prompt (the group each is compared with); must divide "
        "training.micro_batch_size x training.grad_accum x processes (the completions per optimizer step).",
    )
    max_completion_length: int = Field(256, gt=0, le=2**20, description="Longest generated completion, in tokens.")
    temperature: float = Field(1.0, gt=0, le=100, description="Sampling temperature of the generations.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest token set of this mass.")
    rewards: list[RewardEntry] = Field(
        min_length=1,
        description="The reward functions, summed with their weights: [{name, weight, options…}]; built-ins: "
        "accuracy {column, extract: last_number / boxed / regex / whole, pattern}, format {pattern}, length "
        "{target, unit: tokens / words / chars}; or path/to/file.py:name, package.module:name.",
    )
    system_prompt: str | None = Field(
        None,
        description="A system message put first in every prompt: a text prompt becomes a chat (this message, then "
        "the prompt as the user turn, rendered by the chat template); a chat gets it unless it starts with a system "
        "message. null: the prompts as the data has them (text prompts are fed to the model as plain text).",
    )
    samples_every: int | None = Field(
        10,
        gt=0,
        le=INT32_MAX,
        description="Every N steps, write a few prompts with their completions and rewards to "
        "output_dir/samples.jsonl (null: never).",
    )
    samples: int = Field(4, gt=0, le=1024, description="Completions written to samples.jsonl each time.")
    use_vllm: bool = Field(
        False,
        description="Generate with vLLM (pip install 'qtune[vllm]', a GPU) instead of transformers' generate on the "
        "4-bit base with the adapter.",
    )


class GrpoSection(_OnlineSection):
    """Group Relative Policy Optimization (TRL GRPOConfig); used with `method: grpo`."""

    beta: float = Field(
        0.0, ge=0, le=1000, description="KL penalty towards the starting policy (0: none, no reference pass; TRL's)."
    )
    loss_type: Literal[GRPO_LOSS_TYPES] = Field(
        "dapo", description="TRL's GRPO loss: dapo, grpo, dr_grpo, bnpo, cispo, sapo, luspo, vespo."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward std of the group, of the batch, or not at all (Dr GRPO)."
    )


class RlooSection(_OnlineSection):
    """REINFORCE Leave-One-Out (TRL RLOOConfig); used with `method: rloo`."""

    num_generations: int = Field(
        4,
        ge=2,
        le=4096,
        description="Completions per prompt (each baseline is the others' mean); must divide "
        "training.micro_batch_size x training.grad_accum x processes.",
    )
    beta: float = Field(0.05, ge=0, le=1000, description="KL penalty towards the starting policy (TRL's).")


# Each method with settings: its section in the recipe (named after it).
METHOD_SECTIONS = ("dpo", "kto", "orpo", "simpo", "reward", "grpo", "rloo")


class Recipe(Section):
    """A whole run, from base model to saved adapter."""

    method: Literal[METHODS] = Field(
        "sft",
        description="The training method: sft (supervised); dpo, orpo, simpo (preference pairs); kto (completions "
        "labelled desirable or not, or pairs); reward (a sequence-classification reward model from preference "
        "pairs); grpo, rloo (prompts: completions generated and scored by reward functions). The method's settings "
        "go in the section of the same name.",
    )
    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    training: TrainingSection = TrainingSection()
    tracking: TrackingSection = TrackingSection()
    hub: HubSection = HubSection()
    dpo: DpoSection | None = Field(None, description="DPO settings (method: dpo); filled with defaults then.")
    kto: KtoSection | None = Field(None, description="KTO settings (method: kto); filled with defaults then.")
    orpo: OrpoSection | None = Field(None, description="ORPO settings (method: orpo); filled with defaults then.")
    simpo: SimpoSection | None = Field(None, description="SimPO settings (method: simpo); filled with defaults then.")
    reward: RewardSection | None = Field(
        None, description="Reward-model settings (method: reward); filled with defaults then."
    )
    grpo: GrpoSection | None = Field(None, description="GRPO settings (method: grpo); rewards is required.")
    rloo: RlooSection | None = Field(None, description="RLOO settings (method: rloo); rewards is required.")
    output_dir: str = Field(
        description="The run directory: adapter/, checkpoints/, recipe.yaml. A recipe file without it runs in "
        "runs/<the file's name without .yaml>."
    )

    @field_validator("output_dir")
    @classmethod
    def _expand_user(cls, v: str) -> str:
        return _local_path(v)

    @model_validator(mode="before")
    @classmethod
    def _method_section_defaults(cls, data: Any) -> Any:
        """The chosen method's section, with its defaults, when the recipe leaves it out."""
        method = data.get("method") if isinstance(data, dict) else None
        if method in METHOD_SECTIONS and data.get(method) is None:
            data = {**data, method: {}}
        return data

    @field_validator(*METHOD_SECTIONS)
    @classmethod
    def _section_of_method(cls, v: Any, info: ValidationInfo) -> Any:
        """A method's section (checked field by field: `method` comes first) belongs to that method only."""
        method = info.data.get("method")
        if v is not None and method is not None and method != info.field_name:
            raise ValueError(
                f"settings for method {info.field_name}, but method is {method}: set method: {info.field_name}, "
                f"or remove the {info.field_name} section"
            )
        return v

    @field_validator("data")
    @classmethod
    def _data_for_method(cls, v: DataSection, info: ValidationInfo) -> DataSection:
        method = info.data.get("method")
        if method in ONLINE_METHODS:
            if v.packing or v.train_on != "completions":
                key = "packing" if v.packing else "train_on"
                raise ValueError(
                    f"{key}: method {method} trains on the completions it generates from the prompts; leave "
                    f"data.{key} at its default"
                )
        elif method not in (None, "sft"):
            if v.packing:
                raise ValueError(
                    f"packing: TRL's {method.upper()} does not pack preference data; set data.packing: false"
                )
            if v.train_on != "completions":
                scores = {
                    "kto": "scores the labelled completions (never the prompt)",
                    "reward": "scores each whole chosen and rejected sequence (prompt included) with its head",
                }.get(method, "scores the chosen and rejected completions (never the prompt)")
                raise ValueError(
                    f"train_on: {v.train_on} does not apply to method {method}, which {scores}; leave data.train_on "
                    "at completions"
                )
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.training.eval_steps and self.data.eval_split is None:
            raise ValueError("training.eval_steps needs data.eval_split (a held-out fraction)")
        if self.hub.push and not self.hub.repo_id:
            raise ValueError("hub.push needs hub.repo_id")
        if self.training.resume and self.training.overwrite:
            raise ValueError("training.resume and training.overwrite exclude each other")
        if self.kto is not None and self.kto.loss_type == "kto" and self.training.micro_batch_size < 2:
            raise ValueError(
                "training.micro_batch_size: 1 with method kto: KTO estimates its KL term from the other completions "
                "of each micro-batch (TRL needs 2 or more); raise it (lower grad_accum to keep the batch), or set "
                "kto.loss_type: apo_zero_unpaired"
            )
        return self


# --------------------------------------------------------------------------- loading


# A recipe is a few kB; a file far larger is the wrong file (a dataset, a checkpoint) and is not read whole.
MAX_RECIPE_BYTES = 10 * 2**20
# Python refuses to turn a string of more digits than this into an int (sys.get_int_max_str_digits).
MAX_NUMBER_CHARS = 4000
# PyYAML composes nested collections recursively: deeper than this, Python's recursion limit is near.
MAX_DEPTH = 100


class _YamlProblem(Exception):
    """A refusal found while reading the YAML: message, 1-based line, hint (the file is added by the caller)."""

    def __init__(self, message: str, line: int | None, hint: str | None = None):
        super().__init__(message)
        self.message, self.line, self.hint = message, line, hint


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases and without numbers Python cannot convert.

    Aliases are refused, not expanded: a few hundred bytes of nested aliases (`b: [*a, *a, …]`) expand to
    billions of nodes in whatever walks the result, and no shipped recipe uses them."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _YamlProblem(
                f"YAML alias *{_abbrev(str(event.anchor))} (recipes refuse anchors and aliases)",
                event.start_mark.line + 1,
                "write the values out in full; an alias can expand a small file into gigabytes",
            )
        # Counted on the composer's own stack of open collections: deeper nesting ends in a RecursionError.
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DEPTH:
            raise _YamlProblem(
                f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark.line + 1, "a recipe is flat"
            )
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_scalar(self, node: yaml.ScalarNode) -> Any:
        if len(node.value) > MAX_NUMBER_CHARS and node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
            raise _YamlProblem(f"a number of {len(node.value)} characters", node.start_mark.line + 1)
        return super().construct_scalar(node)


def _parse_yaml(text: str) -> tuple[Any, dict[tuple, int]]:
    """The document and the 1-based line of each key path; duplicate keys refused (YAML would keep the last)."""
    loader = _RecipeLoader(text)
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode):
                    key = loader.construct_object(key_node)  # so `on:` and `yes:` (both true) count as one key
                    if key in first:
                        raise _YamlProblem(
                            f"duplicate key '{_abbrev(_dotted((*path, key_node.value)))}' (first on line {first[key]})",
                            line,
                            "YAML would silently keep only the last one: remove one of them",
                        )
                    first[key] = line
                sub = (*path, key_node.value)
                lines[sub] = line
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    try:
        root = loader.get_single_node()
        if root is None:
            return None, lines
        walk(root, ())
        return loader.construct_document(root), lines
    finally:
        loader.dispose()


def _read_yaml(file: Path) -> tuple[Any, dict[tuple, int]]:
    """A recipe file's document and line map; every way it cannot be read is one QtuneError naming the file."""
    try:
        size = file.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise QtuneError(
                f"{file}: {size} bytes is not a recipe (at most {MAX_RECIPE_BYTES // 2**20} MiB)",
                "give the recipe's .yaml file",
            )
        raw = file.read_bytes()
    except OSError as exc:
        raise QtuneError(f"cannot read recipe {file}: {exc.strerror or exc}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise QtuneError(
            f"{file}: is UTF-16 text, not UTF-8", "save it as UTF-8 (Windows PowerShell's > writes UTF-16)"
        )
    nul = raw.find(b"\0")
    if nul >= 0:
        raise QtuneError(f"{file}: is a binary file, not a YAML recipe (NUL byte at offset {nul})")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise QtuneError(
            f"{file}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            "save the recipe as UTF-8",
        ) from None
    try:
        return _parse_yaml(text)
    except _YamlProblem as exc:
        where = f"{file}:{exc.line}" if exc.line else str(file)
        raise QtuneError(f"{where}: {exc.message}", exc.hint) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        code = ord(exc.character) if isinstance(exc.character, str) else exc.character
        raise QtuneError(
            f"{file}:{line}: invalid YAML: control character {code:#06x} is not allowed in YAML",
            "remove the control character (a recipe is plain text)",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, opened = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context == "expected a single document in the stream":
            raise QtuneError(
                f"{where}: a second YAML document starts here (a recipe is one document)",
                "remove this `---` and what follows, or split the file into two recipes",
            ) from None
        if context and opened and (not mark or opened.line != mark.line):
            # e.g. an unclosed quote or bracket: the parser fails at the end, the fix is where it opened
            problem += f" ({context} that starts on line {opened.line + 1})"
        hint = "check indentation and quoting on that line"
        if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in str(problem):
            hint = "a recipe holds plain values: no YAML tags (!!python/…, !custom)"
        raise QtuneError(f"{where}: invalid YAML: {_abbrev(problem, 200)}", hint) from None


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The schema class that owns the keys at `path` (for did-you-mean hints)."""
    cls: Any = Recipe
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        cls = _inner_model(cls.model_fields[part].annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


# Names other tools (peft, bitsandbytes, transformers) use for a recipe key, for did-you-mean hints that
# spelling similarity alone misses (rank -> r, learning_rate -> lr); used only where the key exists.
KEY_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "scheduler",
    "optim": "optimizer",
    "bnb_4bit_quant_type": "quant_type",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
    "max_seq_length": "max_length",
}


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _abbrev(text: str, limit: int = 80) -> str:
    """Text short enough for one error line: a 10 kB key or override shows its start and its length."""
    return text if len(text) <= limit else f"{text[: limit // 2]}… ({len(text)} chars)"


def _shown(value: Any) -> str:
    """A bad value as an error line shows it (repr), abbreviated; a 400-digit number shows its first digits."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**80:
        digits = str(value)
        return f"{digits[:40]}… ({len(digits)} chars)"
    if isinstance(value, str) and len(value) > 80:
        return f"{value[:40]!r}… ({len(value)} chars)"
    return _abbrev(repr(value))


def _valid_range(loc: tuple) -> str | None:
    """A numeric key's bounds as a reader writes them, e.g. `0 < training.lr ≤ 1`, for hints."""
    owner = _model_at(loc[:-1])
    if owner is None or not loc or loc[-1] not in owner.model_fields:
        return None
    low = high = ""
    for bound in owner.model_fields[loc[-1]].metadata:
        for attr, low_text, high_text in (("gt", "<", None), ("ge", "≤", None), ("lt", None, "<"), ("le", None, "≤")):
            value = getattr(bound, attr, None)
            if value is not None:
                if low_text:
                    low = f"{value} {low_text} "
                else:
                    high = f" {high_text} {value}"
    if not (low or high):
        return None
    annotation = owner.model_fields[loc[-1]].annotation
    kind = "a whole number" if int in (annotation, *typing.get_args(annotation)) else "a finite number"
    return f"valid: {low}{_dotted(loc)}{high}, {kind}"


def _format_error(err: dict, source: str, lines: dict[tuple, int], overrides: dict[tuple, str]) -> QtuneError:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = _abbrev(_dotted(loc)) or "(top level)"
    where = source
    # An override below the key (`lora.r.x=1` makes lora.r a section) is still where the bad value came from.
    deeper = [text for path, text in overrides.items() if loc and len(path) > len(loc) and path[: len(loc)] == loc]
    if deeper:
        where = f"override '{_abbrev(deeper[-1])}'"
    else:
        for i in range(len(loc), 0, -1):
            if loc[:i] in overrides:
                where = f"override '{_abbrev(overrides[loc[:i]])}'"
                break
            if loc[:i] in lines:
                where = f"{source}:{lines[loc[:i]]}"
                break
    hint = None
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        valid = sorted(owner.model_fields) if owner else []
        alias = KEY_ALIASES.get(str(loc[-1]))
        close = [alias] if alias in valid else difflib.get_close_matches(str(loc[-1])[:100], valid, n=1)
        msg = f"unknown key '{key}'"
        hint = (f"did you mean '{_dotted((*loc[:-1], close[0]))}'? " if close else "") + (
            f"valid keys here: {', '.join(valid)}" if valid else ""
        )
        if loc == ("hub", "token"):
            hint = "tokens never go in a recipe: set HF_TOKEN or run `hf auth login`"
    elif err["type"] == "missing":
        msg = f"missing required key '{key}'"
        owner = _model_at(loc[:-1])
        if owner and loc[-1] in owner.model_fields:
            hint = owner.model_fields[loc[-1]].description
    else:
        got = err.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {_shown(got)})"
        msg = f"{key}: {_abbrev(err['msg'].removeprefix('Value error, '), 300)}{got_text}"
        hint = _valid_range(loc)
    return QtuneError(f"{where}: {msg}", hint)


def parse_override(text: str) -> tuple[tuple, Any]:
    """`lora.r=8` → (("lora", "r"), 8); the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise QtuneError(f"override '{_abbrev(text)}' is not key.sub=value", "e.g. training.lr=1e-4 lora.r=8")
    key, _, raw = text.partition("=")
    parts = _key_path(key, text)
    try:  # the recipe's own YAML rules: no aliases, no numbers Python cannot hold
        value = _parse_yaml(raw)[0] if raw.strip() else None
    except _YamlProblem as exc:
        raise QtuneError(f"override '{_abbrev(text)}': {exc.message}", exc.hint) from None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return parts, value


def _key_path(key: str, text: str) -> tuple:
    """`data.datasets.0.path` → ("data", "datasets", 0, "path"); `text` is the override as the user wrote it."""
    # A list index is a short run of ASCII digits (int() of 5000 digits, or of '²', would raise).
    parts = tuple(int(p) if p.isascii() and p.isdigit() and len(p) < 10 else p for p in key.strip().split("."))
    if not key.strip() or any(p == "" for p in parts):
        raise QtuneError(f"override '{_abbrev(text)}' has an empty key", "e.g. training.lr=1e-4")
    return parts


def _plain(value: Any) -> Any:
    """Python values as YAML would give them: paths as strings, tuples as lists (a recipe given as a dict)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _override_items(overrides: Any) -> list[tuple[tuple, Any, str]]:
    """(key path, value, the override as shown in errors) for each override: `key.sub=value` strings (values read as
    YAML, as on the command line) or a dict {"key.sub": value} (Python values, as they are)."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        items = []
        for key, value in overrides.items():
            if not isinstance(key, str):
                raise QtuneError(
                    f"override key {_abbrev(repr(key))} is not a string", "keys are key paths: {'training.lr': 1e-4}"
                )
            text = f"{key}={_abbrev(repr(value))}"
            items.append((_key_path(key, text), _plain(value), text))
        return items
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise QtuneError(
            f"overrides must be a list of key.sub=value strings or a dict, not {_abbrev(repr(overrides))}",
            "e.g. ['training.lr=1e-4', 'lora.r=8'] or {'training.lr': 1e-4, 'lora.r': 8}",
        )
    return [(*parse_override(text), text) for text in overrides]


def _apply_override(data: dict, path: tuple, value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(path):
        here = _abbrev(_dotted(path[: i + 1]))
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise QtuneError(
                    f"override '{_abbrev(text)}': {here} does not exist",
                    f"{_abbrev(_dotted(path[:i]))} is a list of {len(node)}, numbered from 0",
                )
        elif not isinstance(node, dict):
            raise QtuneError(f"override '{_abbrev(text)}': {_abbrev(_dotted(path[:i]))} is not a section")
        if i == len(path) - 1:
            node[part] = value
        elif isinstance(node, dict) and node.get(part) is None:
            node[part] = {}
            node = node[part]
        else:
            node = node[part]


def load_recipe(
    source: str | os.PathLike | dict | Recipe,
    overrides: list[str] | tuple[str, ...] | dict[str, Any] | None = (),
) -> Recipe:
    """Read, override and validate a recipe; every problem is a QtuneError naming file, key and line.

    `source`: a YAML file; a dict of sections (the file's keys, Python values; output_dir required), or a Recipe
    (re-validated with the overrides). `overrides`: `key.sub=value` strings as on the command line, or a dict
    {"key.sub": value}."""
    lines: dict[tuple, int] = {}
    if isinstance(source, Recipe):
        if not overrides:
            return source
        name, data = "recipe", source.model_dump(mode="python")
    elif isinstance(source, dict):
        name, data = "recipe dict", _plain(source)  # a copy: the overrides never change the caller's dict
        if not all(isinstance(k, str) for k in data):
            raise QtuneError("recipe dict: its keys are section names (model, data, …), strings")
    elif isinstance(source, str | os.PathLike):
        file = Path(source)
        name = str(file)
        if not file.is_file():
            what = "is not a file" if file.exists() else "not found"
            raise QtuneError(
                f"recipe file {what}: {file}", "give the path of a .yaml recipe, e.g. recipes/llama2-qlora.yaml"
            )
        data, lines = _read_yaml(file)
        if data is None:
            raise QtuneError(
                f"{file}: the recipe is empty",
                "a recipe needs at least model.name and data.datasets (see recipes/, or `qtune recipe-reference`)",
            )
        if not isinstance(data, dict):
            raise QtuneError(
                f"{file}: a recipe is a mapping of sections (model:, data:, …), not {type(data).__name__}",
                "start from one of the recipes in recipes/",
            )
        data.setdefault("output_dir", f"runs/{file.stem}")
    else:
        raise QtuneError(
            f"a recipe is a YAML file's path, a dict or a Recipe, not {type(source).__name__}",
            "e.g. load_recipe('recipes/llama2-qlora.yaml') or load_recipe({'model': {...}, 'data': {...}, …})",
        )

    applied: dict[tuple, str] = {}
    values: dict[tuple, Any] = {}
    for key_path, value, text_override in _override_items(overrides):
        if key_path in values and values[key_path] != value:
            # --resume / --overwrite arrive here as overrides too: a contradiction must not be settled by order
            raise QtuneError(
                f"override '{_abbrev(text_override)}' contradicts '{_abbrev(applied[key_path])}'",
                "give each key once",
            )
        _apply_override(data, key_path, value, text_override)
        applied[key_path], values[key_path] = text_override, value

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        error = _format_error(errors[0], name, lines, applied)
        if len(errors) > 1:
            error.message += f" (+{len(errors) - 1} more)"
        raise error from None
    _check_output_dir(recipe, name, lines, applied)
    return recipe


def _check_output_dir(recipe: Recipe, source: str, lines: dict[tuple, int], overrides: dict[tuple, str]) -> None:
    """output_dir must not lie inside a data folder: the next run would read its outputs as training rows."""
    out = Path(recipe.output_dir).resolve()
    for i, dataset in enumerate(recipe.data.datasets):
        folder = Path(dataset.path)
        if not folder.is_dir():
            continue
        folder = folder.resolve()
        if out == folder or folder in out.parents:
            if ("output_dir",) in overrides:
                where = f"override '{_abbrev(overrides[('output_dir',)])}'"
            else:
                where = f"{source}:{lines[('output_dir',)]}" if ("output_dir",) in lines else source
            raise QtuneError(
                f"{where}: output_dir {_abbrev(recipe.output_dir)} is inside the data folder "
                f"data.datasets.{i}.path {_abbrev(dataset.path)}",
                "qtune reads every file under a data folder as training data, its own outputs too: "
                "put output_dir outside it",
            )


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if value is not None and any(word in key.lower() for word in SECRET_WORDS):
        return "<redacted>"
    return value


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data, with any secret-looking value redacted."""
    return _redact(recipe.model_dump(mode="json"))


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a value seen twice out twice: load_recipe refuses aliases, and must read what qtune wrote."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (defaults filled in, overrides applied) atomically."""
    from qtune.rundir import write_text_atomic

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, yaml.dump(recipe_to_dict(recipe), Dumper=_NoAliasDumper, sort_keys=False))


def _type_text(annotation: Any) -> str:
    """A type as a reader says it (no `|`, which would split a Markdown table cell)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " / ".join("null" if a is None else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args)
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def recipe_reference() -> str:
    """The recipe's keys, types, defaults and descriptions as a Markdown table (`qtune recipe-reference`, README)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def add(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            sub = _inner_model(field.annotation)
            key = f"{prefix}{name}"
            if sub is not None and sub is not cls and name != "extra":
                if sub is DatasetSource:
                    add(sub, f"{key}[].")
                    continue
                add(sub, f"{key}.")
                continue
            default = "required" if field.is_required() else field.get_default(call_default_factory=True)
            if default is None or isinstance(default, bool):
                default = {None: "null", True: "true", False: "false"}[default]
            rows.append(f"| `{key}` | {_type_text(field.annotation)} | `{default}` | {field.description or ''} |")

    add(Recipe, "")
    return "\n".join(rows)


# --------------------------------------------------------------------------- JSON Schema (`qtune schema`)

# Numbers a recipe may write as strings: PyYAML (YAML 1.1) reads 2e-4 (no dot) or 1.0e3 (no exponent sign) as a
# string, which the recipe parses, as pydantic parses any number in a string ("16", "2e-4", "1_000", " .5").
NUMBER_STRING = (
    r"^\s*[+-]?([0-9]+(_[0-9]+)*(\.([0-9]+(_[0-9]+)*)?)?|\.[0-9]+(_[0-9]+)*)([eE][+-]?[0-9]+(_[0-9]+)*)?\s*$"
)
INTEGER_STRING = r"^\s*[+-]?[0-9]+(_[0-9]+)*(\.0+)?\s*$"
SCHEMA_DRAFT = "http://json-schema.org/draft-07/schema#"  # what the YAML language server (VS Code) validates with


def _json_schema_generator():
    from pydantic.json_schema import GenerateJsonSchema

    class RecipeJsonSchema(GenerateJsonSchema):
        """Numbers also as the strings the recipe parses (a YAML 1.1 `2e-4`); everything else as pydantic writes it."""

        def float_schema(self, schema):
            return {"anyOf": [super().float_schema(schema), {"type": "string", "pattern": NUMBER_STRING}]}

        def int_schema(self, schema):
            return {"anyOf": [super().int_schema(schema), {"type": "string", "pattern": INTEGER_STRING}]}

    return RecipeJsonSchema


def _tidy(node: Any) -> Any:
    """pydantic's schema made plain draft-07: no generated titles, `$ref` alone in its object (draft-07 ignores a
    `$ref`'s siblings, so a section's description and default go beside an allOf), nested anyOf flattened."""
    if isinstance(node, list):
        return [_tidy(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "title":
            continue
        if key in ("properties", "definitions"):  # names → schemas (a key here is a recipe key, never a keyword)
            out[key] = {name: _tidy(sub) for name, sub in value.items()}
        elif key == "default":
            out[key] = value
        else:
            out[key] = _tidy(value)
    if "anyOf" in out:
        flat = []
        for alternative in out["anyOf"]:
            flat.extend(alternative["anyOf"] if set(alternative) == {"anyOf"} else [alternative])
        if {"type": "string"} in flat:  # float | str: any string already, the number-as-string form is in it
            flat = [a for a in flat if not (a.get("type") == "string" and set(a) == {"type", "pattern"})]
        out["anyOf"] = flat
    if "$ref" in out and len(out) > 1:
        out["allOf"] = [{"$ref": out.pop("$ref")}]
    return out


def recipe_json_schema() -> dict:
    """The recipe's JSON Schema (draft-07), from the Recipe model: every key's type, default, description and
    choices; additionalProperties false wherever the recipe refuses unknown keys."""
    raw = Recipe.model_json_schema(ref_template="#/definitions/{model}", schema_generator=_json_schema_generator())
    raw["definitions"] = raw.pop("$defs")
    schema = _tidy(raw)
    # A recipe file may leave output_dir out (runs/<file name> then, see load_recipe); a dict may not.
    schema["required"] = [key for key in schema["required"] if key != "output_dir"]
    return {
        "$schema": SCHEMA_DRAFT,
        "title": "qtune recipe",
        "description": "A qtune recipe (`qtune train RECIPE`). Generated by `qtune schema` from qtune.config.Recipe.",
        **{k: v for k, v in schema.items() if k != "description"},
    }


def recipe_json_schema_text() -> str:
    """`qtune schema`'s output, as kept in recipes/recipe.schema.json."""
    import json

    return json.dumps(recipe_json_schema(), indent=2, ensure_ascii=False) + "\n"
