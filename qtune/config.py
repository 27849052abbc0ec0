"""The recipe: one typed, documented schema, loaded from YAML with `key.sub=value` overrides.

Every error names the file, the key path and (where the YAML parser gives one) the line. This module
must not import torch or transformers: `qtune --help` and recipe validation stay instant.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qtune.errors import QtuneError
from qtune.quant import BACKENDS, offered_bits

Dtype = Literal["auto", "bfloat16", "float16", "float32"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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

    r: int = Field(16, gt=0, description="Rank of the update matrices.")
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
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"] = Field(
        "auto",
        description="alpaca: instruction/input/output; sharegpt: conversations of from/value; messages: "
        "OpenAI-style role/content chat; prompt_completion: prompt + completion; text: plain text (continued "
        "pre-training); auto: detected from the columns.",
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
    samples: int | None = Field(
        None, gt=0, description="Take exactly this many rows (repeating the source if it has fewer)."
    )
    weight: float | None = Field(
        None, gt=0, description="Take this multiple of the source's rows (0.5 = half, 2 = twice over)."
    )

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
    max_length: int = Field(2048, gt=0, description="Longest tokenized example; longer ones are truncated.")
    packing: bool = Field(
        False, description="Pack several examples into each row (TRL packing, padding-free position ids)."
    )
    train_on: Literal["completions", "all"] = Field(
        "completions", description="completions: loss on answers only; all: loss on every token."
    )
    chat_template: str | None = Field(
        None,
        description="null: the tokenizer's own; chatml, llama-2, llama-3, mistral or zephyr (built-ins with "
        "{% generation %} markers); or a Jinja template string.",
    )
    eval_split: float | str | None = Field(
        None,
        description="A fraction of the rows held out for eval loss, or the name of a split every source has "
        "(null: no eval).",
    )
    dedup: bool = Field(False, description="Drop exact duplicate rows (after format mapping).")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first bad row (file and row named); skip: drop it, counted."
    )
    max_untrained_share: float = Field(
        0.05, ge=0, le=1, description="Fail when more than this share of examples has no trained token."
    )
    num_proc: int | None = Field(None, gt=0, description="Processes for tokenizing (datasets num_proc).")

    @field_validator("eval_split")
    @classmethod
    def _fraction_or_name(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError("a fraction must be between 0 and 1 (exclusive), or give a split name")
        return v


class TrainingSection(Section):
    """The optimisation (TRL SFTConfig)."""

    epochs: float = Field(1, gt=0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    grad_accum: int = Field(4, gt=0, description="Micro-batches per optimizer step.")
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Examples per optimizer step over all processes, the same whatever the launch: replaces grad_accum "
        "with global_batch_size / (micro_batch_size x processes), which must divide evenly. null: grad_accum "
        "as given (the step then grows with the number of processes).",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (2e-4 or 2.0e-4).")
    scheduler: str = Field("cosine", description="transformers SchedulerType: linear, cosine, constant …")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the steps spent warming up.")
    optimizer: str = Field(
        "adamw_torch", description="transformers OptimizerNames: adamw_torch, paged_adamw_32bit, paged_adamw_8bit …"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapter weights.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping (0.3 as in the QLoRA paper).")
    gradient_checkpointing: bool = Field(True, description="Recompute activations (non-reentrant) to save memory.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision; auto: bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on CPU."
    )
    logging_steps: int = Field(10, gt=0, description="Log loss, lr and grad norm every N steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (needs data.eval_split).")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps (null: no mid-run checkpoints).")
    save_total_limit: int | None = Field(2, gt=0, description="Keep at most this many checkpoints.")
    seed: int = Field(42, description="Seed for weights init, data order and dropout.")
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
    """Experiment tracking."""

    backend: Literal["wandb", "tensorboard", "none"] = Field(
        "none", description="Where metrics go besides the console."
    )
    project: str = Field("qtune", description="W&B project.")
    run_name: str | None = Field(None, description="Run name shown by the tracker.")
    entity: str | None = Field(None, description="W&B team or user.")
    tags: list[str] = Field(default_factory=list, description="W&B tags.")
    group: str | None = Field(None, description="W&B run group.")
    mode: Literal["online", "offline"] = Field(
        "online", description="W&B mode; offline writes output_dir/wandb for `wandb sync`."
    )
    log_model: bool = Field(False, description="Upload the final adapter folder to W&B as a model artifact.")


class HubSection(Section):
    """Publishing to the Hugging Face Hub (the token comes from HF_TOKEN or `hf auth login`, never a recipe)."""

    push: bool = Field(
        False,
        description="Upload the adapter and a model card when training ends, as `qtune push` does; repo id "
        "and token are checked before the model loads, and a failed upload keeps the adapter and prints the retry.",
    )
    repo_id: str | None = Field(None, description="Hub repo, ORG/NAME.")
    private: bool = Field(True, description="Create the repo private.")


class Recipe(Section):
    """A whole run, from base model to saved adapter."""

    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    training: TrainingSection = TrainingSection()
    tracking: TrackingSection = TrackingSection()
    hub: HubSection = HubSection()
    output_dir: str = Field(description="The run directory: adapter/, checkpoints/, recipe.yaml.")

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.training.eval_steps and self.data.eval_split is None:
            raise ValueError("training.eval_steps needs data.eval_split (a held-out fraction)")
        if self.hub.push and not self.hub.repo_id:
            raise ValueError("hub.push needs hub.repo_id")
        if self.training.resume and self.training.overwrite:
            raise ValueError("training.resume and training.overwrite exclude each other")
        return self


# --------------------------------------------------------------------------- loading


def _line_map(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                sub = (*path, key_node.value)
                lines[sub] = key_node.start_mark.line + 1
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


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


def _format_error(err: dict, source: str, lines: dict[tuple, int], overrides: dict[tuple, str]) -> QtuneError:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = _dotted(loc) or "(top level)"
    where = source
    for i in range(len(loc), 0, -1):
        if loc[:i] in overrides:
            where = f"override '{overrides[loc[:i]]}'"
            break
        if loc[:i] in lines:
            where = f"{source}:{lines[loc[:i]]}"
            break
    hint = None
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        valid = sorted(owner.model_fields) if owner else []
        alias = KEY_ALIASES.get(str(loc[-1]))
        close = [alias] if alias in valid else difflib.get_close_matches(str(loc[-1]), valid, n=1)
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
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = f"{key}: {err['msg'].removeprefix('Value error, ')}{got_text}"
    return QtuneError(f"{where}: {msg}", hint)


def parse_override(text: str) -> tuple[tuple, Any]:
    """`lora.r=8` → (("lora", "r"), 8); the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise QtuneError(f"override '{text}' is not key.sub=value", "e.g. training.lr=1e-4 lora.r=8")
    key, _, raw = text.partition("=")
    parts = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    if not key.strip() or any(p == "" for p in parts):
        raise QtuneError(f"override '{text}' has an empty key", "e.g. training.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply_override(data: dict, path: tuple, value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise QtuneError(f"override '{text}': {_dotted(path[: i + 1])} does not exist")
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise QtuneError(f"override '{text}': {_dotted(path[:i])} is not a section")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise QtuneError(f"override '{text}': {_dotted(path)} does not exist")
    elif not isinstance(node, dict):
        raise QtuneError(f"override '{text}': {_dotted(path[:-1])} is not a section")
    node[last] = value


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is a QtuneError naming file, key and line."""
    file = Path(path)
    if not file.is_file():
        raise QtuneError(
            f"recipe file not found: {file}", "give the path of a .yaml recipe, e.g. recipes/llama2-qlora.yaml"
        )
    text = file.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, opened = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and opened and (not mark or opened.line != mark.line):
            # e.g. an unclosed quote or bracket: the parser fails at the end, the fix is where it opened
            problem += f" ({context} that starts on line {opened.line + 1})"
        raise QtuneError(f"{where}: invalid YAML: {problem}", "check indentation and quoting on that line") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QtuneError(f"{file}: a recipe is a mapping of sections (model:, data:, …), not {type(data).__name__}")
    data.setdefault("output_dir", f"runs/{file.stem}")

    applied: dict[tuple, str] = {}
    for text_override in overrides:
        key_path, value = parse_override(text_override)
        _apply_override(data, key_path, value, text_override)
        applied[key_path] = text_override

    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        error = _format_error(errors[0], str(file), _line_map(text), applied)
        if len(errors) > 1:
            error.message += f" (+{len(errors) - 1} more)"
        raise error from None


SECRET_WORDS = ("token", "key", "secret", "password")


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


def dump_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (defaults filled in, overrides applied) atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), encoding="utf-8")
    tmp.replace(target)


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
    """The recipe's keys, types, defaults and descriptions as a Markdown table (for --help-recipe / README)."""
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
