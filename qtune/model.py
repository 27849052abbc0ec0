"""Base model + tokenizer: placement for the launch, quantized loading, k-bit preparation, LoRA.

Knows nothing about datasets or TRL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qtune.config import ONLINE_METHODS, Recipe
from qtune.errors import QtuneError, first_line
from qtune.quant import BACKENDS, backend_of, offered_bits
from qtune.quant import describe as describe_quantization
from qtune.rundir import PICKLE_SUFFIXES, safetensors_problem


@dataclass(frozen=True)
class Launch:
    """How this process was started, read from the launcher's environment (accelerate / torchrun)."""

    world_size: int
    rank: int
    local_rank: int
    distributed_type: str  # accelerate's name when launched through it: MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED, NO
    zero_stage: int | None = None  # DeepSpeed ZeRO stage from the accelerate config (None: not given / not DeepSpeed)
    fsdp_version: int | None = None  # FSDP 1 or 2 from the accelerate config (None: not FSDP)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """The base weights are split over the ranks (FSDP, ZeRO-3): no rank holds, or places, the whole model."""
        return self.distributed_type == "FSDP" or (self.distributed_type == "DEEPSPEED" and self.zero_stage == 3)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_launch() -> Launch:
    """Read the topology without touching torch.distributed (so it is safe before anything loads)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    kind = "NO"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        kind = "FSDP"
    elif env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        kind = "DEEPSPEED"
    elif world > 1:
        kind = "MULTI_CPU" if env.get("ACCELERATE_USE_CPU", "").lower() == "true" else "MULTI_GPU"
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") if kind == "DEEPSPEED" else ""
    version = env.get("FSDP_VERSION", "1") if kind == "FSDP" else ""
    return Launch(
        world,
        int(env.get("RANK", "0")),
        int(env.get("LOCAL_RANK", "0")),
        kind,
        zero_stage=int(stage) if stage.isdigit() else None,
        fsdp_version=int(version) if version.isdigit() else None,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_map_for(recipe: Recipe, launch: Launch):
    """Placement follows the launch: a replica per rank, `auto` over one process's GPUs, one GPU, or the CPU."""
    if recipe.model.device_map == "auto":
        return "auto"
    if launch.sharded:
        return None  # FSDP / ZeRO-3 place the shards themselves (rank 0 loads with cpu_ram_efficient_loading)
    if not _cuda_available():
        return None  # CPU: from_pretrained keeps everything on the CPU
    return {"": launch.local_rank}


def _max_memory(recipe: Recipe) -> dict | None:
    if not recipe.model.max_memory:
        return None
    return {int(k) if k.isdigit() else k: v for k, v in recipe.model.max_memory.items()}


def scores(recipe: Recipe) -> bool:
    """The run trains a reward model (method reward): the base loads as a sequence-classification model with one
    label, its score head trained beside the LoRA adapter, instead of a causal LM."""
    return recipe.method == "reward"


def model_class(recipe: Recipe):
    """The transformers auto class the run's base loads as: AutoModelForSequenceClassification (reward), else
    AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if scores(recipe) else AutoModelForCausalLM


def model_kwargs(recipe: Recipe) -> dict:
    """The class's own from_pretrained arguments: one label (the reward) for a reward model."""
    return {"num_labels": 1} if scores(recipe) else {}


def refuse_reward_run(recipe: Recipe, run_dir, command: str) -> None:
    """chat, merge and export-gguf take runs that trained a causal LM; a reward run's adapter scores text."""
    if not scores(recipe):
        return
    does = "does not generate" if command != "merge" else "is not a causal LM to merge into one"
    raise QtuneError(
        f"qtune {command}: {run_dir} is a reward model (method: reward): a score head + LoRA that scores text and "
        f"{does}",
        "load it with AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1) + "
        f"PeftModel.from_pretrained(model, '{Path(run_dir) / 'adapter'}') to score text (README: Reward models)"
        + ("; merge_and_unload() there gives a standalone classifier" if command == "merge" else ""),
    )


def check_sequence_classification(config, recipe: Recipe) -> None:
    """method reward: transformers has a sequence-classification class for the model's architecture (a score head
    on the decoder), or the checkpoint's own code names one (trust_remote_code)."""
    from transformers import AutoModelForSequenceClassification

    if not scores(recipe):
        return
    if type(config) in AutoModelForSequenceClassification._model_mapping:
        return
    if recipe.model.trust_remote_code and "AutoModelForSequenceClassification" in (
        getattr(config, "auto_map", None) or {}
    ):
        return
    arch = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
    raise QtuneError(
        f"method: reward needs a sequence-classification head on the base, and transformers has no "
        f"sequence-classification class for '{recipe.model.name}' (model_type {config.model_type}, {arch})",
        "use a base whose architecture has one (Llama, Mistral, Qwen2, Gemma, Phi …: "
        "AutoModelForSequenceClassification), or train on the pairs with method dpo, orpo or simpo",
    )


def _meta_model(recipe: Recipe):
    """The model's module tree on the meta device: its shape, with no weights read or downloaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    m = recipe.model
    try:
        config = AutoConfig.from_pretrained(m.name, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QtuneError(
            f"model.name: cannot load a config for '{m.name}': {first}",
            "give a local model folder, or a hub id with network access (or a filled HF cache with HF_HUB_OFFLINE=1)",
        ) from None
    check_sequence_classification(config, recipe)  # reward: before the shape checks below
    try:
        with torch.device("meta"):
            return config, AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    except ValueError as exc:
        raise QtuneError(
            f"model.name: '{m.name}' (model_type {config.model_type}) is not a causal language model "
            f"transformers can build: {str(exc).splitlines()[0]}",
            "qtune fine-tunes decoder LMs (Llama, Mistral, Qwen2, Gemma, Phi …)",
        ) from None


def linear_modules(model) -> list[str]:
    """Full names of the layers bitsandbytes quantizes and LoRA can target (nn.Linear, GPT-2's Conv1D),
    without the output layer, which transformers keeps unquantized."""
    import torch
    from transformers.pytorch_utils import Conv1D

    output_layer = model.get_output_embeddings()
    return [
        name
        for name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and module is not output_layer
    ]


def check_architecture(recipe: Recipe) -> None:
    """Before any weight loads: the model is a causal LM, quantizable as asked, and the LoRA targets exist."""
    import torch

    from qtune.quant import check_backend

    config, meta = _meta_model(recipe)
    check_not_prequantized(config, recipe)  # first: installing an extra would not fix the wrong checkpoint
    positions = getattr(config, "max_position_embeddings", None)  # gpt2's n_positions maps to it too
    if isinstance(positions, int) and recipe.data.max_length > positions:
        raise QtuneError(
            f"data.max_length: {recipe.data.max_length} is more than the {positions} positions of "
            f"{recipe.model.name} ({config.model_type})",
            f"set data.max_length to at most {positions}",
        )
    q = recipe.quantization
    backend = backend_of(recipe)
    if backend.dora and q.bits is not None and recipe.lora.use_dora:
        raise QtuneError(
            f"lora.use_dora: {backend.dora}",
            "set lora.use_dora: false, or train DoRA on an unquantized checkpoint with quantization.backend bnb",
        )
    check_backend(recipe)  # the backend is installed and works here (names quantization.backend / the extra)
    linears = linear_modules(meta)
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linears})
    if q.bits is not None and not linears:
        raise QtuneError(
            f"quantization.bits: model_type '{config.model_type}' has no nn.Linear layers for bitsandbytes to quantize",
            "set quantization.bits: null to train plain LoRA on it",
        )
    if backend.linear_only and any(type(meta.get_submodule(name)) is not torch.nn.Linear for name in linears):
        raise QtuneError(
            f"quantization.backend: {q.backend} quantizes nn.Linear layers only; model_type '{config.model_type}' "
            "has Conv1D",
            "use quantization.backend bnb (default)",
        )
    targets = recipe.lora.target_modules
    if targets != "all-linear":
        all_names = [name for name, _ in meta.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in all_names)]
        if missing:
            raise QtuneError(
                f"lora.target_modules: {', '.join(repr(t) for t in missing)} matches no module of "
                f"{recipe.model.name} ({config.model_type})",
                f"linear modules in this model: {', '.join(leaf_names)} (or use all-linear)",
            )


def prequantized_method(config) -> str | None:
    """quant_method of a checkpoint's own quantization_config (its config.json), None for plain weights."""
    existing = getattr(config, "quantization_config", None)
    if not existing:
        return None
    return existing.get("quant_method", "?") if isinstance(existing, dict) else "?"


def prequantized_bits(config) -> int | None:
    """bits of a checkpoint's own quantization_config (GPTQ / AWQ write it), None when it has none."""
    existing = getattr(config, "quantization_config", None)
    bits = existing.get("bits") if isinstance(existing, dict) else getattr(existing, "bits", None)
    return bits if isinstance(bits, int) else None


def check_not_prequantized(config, recipe: Recipe) -> None:
    """The checkpoint's own quantization fits the recipe.

    quantization.backend gptq trains on a GPTQ checkpoint as it was saved: the checkpoint must be GPTQ, with the
    recipe's bits. Any other backend (and bits: null) needs unquantized weights: a checkpoint saved quantized
    (GPTQ, AWQ, bitsandbytes, …) cannot be quantized again, and with bits: null transformers 5.24 drops its
    quantization_config, so the packed weights would not load (GPTQ / AWQ would train on uninitialised layers;
    bnb ends in a size mismatch)."""
    method = prequantized_method(config)
    q = recipe.quantization
    name = recipe.model.name
    backend = backend_of(recipe)
    if backend.refused:
        return  # check_backend says why
    takers = [b for b in BACKENDS.values() if b.checkpoint and not b.refused]  # backends that train on one as it is
    if backend.checkpoint and q.bits is not None:
        kind = backend.checkpoint.upper()
        if method != backend.checkpoint:
            what = f"is quantized with {method}" if method else "has no quantization_config (plain weights)"
            quantizers = [b.name for b in BACKENDS.values() if not b.checkpoint and not b.refused]
            raise QtuneError(
                f"quantization.backend: {q.backend} trains on a pre-quantized {kind} checkpoint; '{name}' {what}",
                f"give a {kind} checkpoint as model.name (its config.json has quantization_config.quant_method: "
                f"{backend.checkpoint}), or quantize this one with quantization.backend "
                f"{', '.join(quantizers[:-1])} or {quantizers[-1]}",
            )
        bits = prequantized_bits(config)
        if bits != q.bits:
            offered = offered_bits(backend)
            raise QtuneError(
                f"quantization.bits: {q.bits}, but '{name}' is a {bits}-bit {kind} checkpoint",
                f"set quantization.bits: {bits} (backend {q.backend} loads the checkpoint as it was saved)"
                if bits in offered
                else f"qtune trains on {'- or '.join(map(str, offered))}-bit {kind} checkpoints",
            )
        return
    if method:
        key = "model.name" if q.bits is None else "quantization.bits"
        hint = (
            "use the unquantized checkpoint it was made from (quantization.bits: null does not load saved "
            f"{method} weights either)"
        )
        taker = next((b for b in takers if b.checkpoint == method), None)
        if taker is not None:
            bits = prequantized_bits(config)
            hint += f", or set quantization.backend: {taker.name} and quantization.bits: {bits} to train LoRA on it as it is"
        why = (
            "quantization.bits: null trains plain LoRA on unquantized weights"
            if q.bits is None
            else f"quantization.backend {q.backend} quantizes an unquantized checkpoint itself"
        )
        raise QtuneError(
            f"{key}: '{name}' is already quantized ({method}); {why} (only quantization.backend "
            f"{' or '.join(b.name for b in takers)} takes a checkpoint saved quantized: "
            f"{' or '.join(f'a {b.checkpoint.upper()} one' for b in takers)}, as it is)",
            hint,
        )


def check_weight_files(model: str, allow_pickle: bool, flag: str | None = "--allow-pickle") -> None:
    """A local model folder's weights: safetensors files that are whole (a download cut short is named before
    anything loads), and no pickle files unless the user accepts pickle's risk (`flag`: the option of the command
    at hand that does, named in the hint; None where the command has none)."""
    folder = Path(model)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise QtuneError(
                f"{path}: damaged weights file ({problem})", "download or copy the model again; nothing was written"
            )
    if allow_pickle:
        return
    names = [p.name for p in folder.iterdir()]
    if not any(n.endswith(".safetensors") for n in names) and any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise QtuneError(
            f"{folder}: weights are pickle files ({', '.join(n for n in names if n.endswith(PICKLE_SUFFIXES))}); "
            "loading a pickle can run arbitrary code",
            "convert them to safetensors" + (f", or pass {flag} if you trust where they came from" if flag else ""),
        )


def base_fingerprint(model: str) -> str | None:
    """A short fingerprint of a local model folder's weights and config (each file's name, size and the SHA-256 of
    its first and last MiB; whole small files), so a merge can tell that the base changed since training without
    reading gigabytes. None for a hub id (its revision names its weights)."""
    import hashlib

    folder = Path(model)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    weights = ("config.json", ".safetensors", *PICKLE_SUFFIXES)
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(weights)):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(2**20))
            if size > 2**21:
                handle.seek(-(2**20), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def read_checkpoint_config(model: str, revision=None, trust_remote_code=False):
    """MODEL's config, None when it cannot be read (loading the model then reports why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def check_unquantized_checkpoint(model: str, key: str, command: str, fix: str, revision=None, trust_remote_code=False):
    """Before loading: MODEL's config.json carries no quantization_config (GPTQ, AWQ, bitsandbytes, …)."""
    config = read_checkpoint_config(model, revision, trust_remote_code)
    method = prequantized_method(config) if config is not None else None
    if method:
        raise QtuneError(
            f"{key}: '{model}' is already quantized ({method}); {command} needs unquantized weights "
            "(bf16 / fp16 / fp32)",
            f"{fix} the unquantized checkpoint it was made from",
        )


def check_prequantized_base(model: str, key: str, recipe: Recipe, revision=None) -> None:
    """Before loading: MODEL is a checkpoint saved quantized the way the run's backend trains on one (backend gptq:
    a GPTQ checkpoint), with the bits the run trained on."""
    from qtune.quant import backend_of

    kind = backend_of(recipe).checkpoint
    config = read_checkpoint_config(model, revision, recipe.model.trust_remote_code)
    if config is None:
        return
    method, bits = prequantized_method(config), prequantized_bits(config)
    if method == kind and bits == recipe.quantization.bits:
        return
    found = (
        f"a {method} checkpoint" + (f" ({bits}-bit)" if bits else "")
        if method
        else "plain weights (no quantization_config)"
    )
    name = kind.upper()
    raise QtuneError(
        f"{key}: '{model}' is {found}; the run trained LoRA on a {recipe.quantization.bits}-bit {name} checkpoint "
        f"(quantization.backend: {recipe.quantization.backend}), which merge --onto dequantized dequantizes",
        f"pass --base the {name} checkpoint the run trained on, or --onto original --base the unquantized "
        "checkpoint it was made from",
    )


def load_tokenizer(recipe: Recipe):
    """The tokenizer, with a pad token that is not the end-of-sequence token where the vocabulary has one."""
    from transformers import AutoTokenizer

    m = recipe.model
    # A run continued from a local adapter (SFT -> DPO) uses the tokenizer saved with it: the chat template and pad
    # token it was trained with. A Hub adapter's tokenizer is named with model.tokenizer.
    continued = _local_adapter_folder(m.adapter) if m.adapter and not m.tokenizer else None
    continued = continued if continued is not None and (continued / "tokenizer_config.json").is_file() else None
    source = m.tokenizer or (str(continued) if continued else m.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=None if continued else m.revision, trust_remote_code=m.trust_remote_code
        )
    except (OSError, ValueError, TypeError) as exc:
        key = "model.tokenizer" if m.tokenizer else "model.adapter" if continued else "model.name"
        raise QtuneError(
            f"{key}: cannot load a tokenizer from '{source}': {first_line(exc)}",
            "the folder needs tokenizer.json or tokenizer.model (+ tokenizer_config.json); set model.tokenizer to "
            "the folder or hub id that has them",
        ) from None
    if tokenizer.pad_token is None:
        # A distinct pad keeps generation and attention masks unambiguous: unk, else a special token the
        # vocabulary reserves and nothing writes (Llama-3's <|finetune_right_pad_id|>, Qwen's <|endoftext|>).
        pad = tokenizer.unk_token or unused_special_token(tokenizer)
        if pad is None and tokenizer.eos_token is not None:
            pad = tokenizer.eos_token
            if detect_launch().is_main:
                import sys

                print(
                    f"qtune: note: {m.tokenizer or m.name} has no pad, unk or unused reserved token: padding with eos "
                    f"{pad!r} (TRL masks padding by position; the data check fails if {pad!r} is never trained)",
                    file=sys.stderr,
                )
        tokenizer.pad_token = pad
    return tokenizer


PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<pad>", "[PAD]", "<|pad|>", "<|padding|>")


def unused_special_token(tokenizer) -> str | None:
    """A special token of the vocabulary that is free to pad with: a named pad token, else the first
    `<|reserved_special_token_N|>`, else `<|endoftext|>`; never eos, bos, or a token the chat template writes."""
    import re

    taken = {tokenizer.eos_token, tokenizer.bos_token}
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    special = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special]
    free = [t for t in special if t not in taken and t not in template]
    reserved = [t for t in free if re.fullmatch(r"<\|reserved_special_token_\d+\|>", t)]
    for token in [*[t for t in PAD_CANDIDATES if t in free], *reserved, "<|endoftext|>"]:
        if token in free:
            return token
    return None


def _keep_cpu_4bit_trainable(model) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first no-grad forward
    (e.g. an eval pass); that kernel has no backward, so later training steps get no gradient through the
    frozen layers and the adapter stops learning. Keep the trainable layout on the CPU."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base(recipe: Recipe, launch: Launch | None = None, base: str | None = None, allow_pickle: bool = False):
    """The base exactly as training loads it: the recipe's quantization config, dtype, attention and placement for
    the launch (one process when none is given). `base` loads the same model from another path (merge --base).

    bitsandbytes' CPU repack is disabled on every 4-bit layer, so a no-grad forward (an eval pass, a merge's
    reference logits) cannot change the stored weights or stop training from learning."""
    import contextlib

    from qtune.quant import checkpoint_config_notice_silenced, quantization_config, quantize_after_load, resolve_dtype

    m = recipe.model
    launch = launch if launch is not None else Launch(1, 0, 0, "NO")
    kwargs = {"attn_implementation": m.attn_implementation} if m.attn_implementation else {}
    if not allow_pickle:
        kwargs["use_safetensors"] = True  # a hub repo with .bin weights only fails to load: the hint says why
    check_weight_files(base or m.name, allow_pickle)
    head = _new_score_head_expected() if scores(recipe) else contextlib.nullcontext()
    try:
        with checkpoint_config_notice_silenced(), head:  # backend gptq: the checkpoint's own config, our kernel
            model = model_class(recipe).from_pretrained(
                base or m.name,
                revision=None if base else m.revision,
                trust_remote_code=m.trust_remote_code,
                quantization_config=quantization_config(recipe, launch),
                dtype=resolve_dtype(m.dtype),
                device_map=device_map_for(recipe, launch),
                max_memory=_max_memory(recipe),
                **model_kwargs(recipe),
                **kwargs,
            )
    except OSError as exc:
        raise QtuneError(
            f"{'--base' if base else 'model.name'}: cannot load the base model '{base or m.name}': {first_line(exc)}",
            "the folder must still hold the weights the run trained on (or pass --base where it moved to)"
            if base is None and Path(m.name).is_absolute()
            else "give a local model folder with safetensors weights (or pass --allow-pickle for .bin weights you "
            "trust), or a hub id with network access",
        ) from None
    model = quantize_after_load(recipe, model)  # hqq on transformers 5.x: quantized here, not while loading
    if recipe.quantization.bits is not None:
        _keep_cpu_4bit_trainable(model)
    return model


@__import__("contextlib").contextmanager
def _new_score_head_expected():
    """A causal LM checkpoint loaded as a sequence classifier has an lm_head it does not use and no score head
    (a new one, or the adapter's): expected, not a load problem to report (TRL's RewardTrainer does the same)."""
    from transformers.modeling_layers import GenericForSequenceClassification as cls

    saved = (
        getattr(cls, "_keys_to_ignore_on_load_missing", None),
        getattr(cls, "_keys_to_ignore_on_load_unexpected", None),
    )
    cls._keys_to_ignore_on_load_missing = [*(saved[0] or []), r"^score\.weight$"]
    cls._keys_to_ignore_on_load_unexpected = [*(saved[1] or []), r"^lm_head\."]
    try:
        yield
    finally:
        cls._keys_to_ignore_on_load_missing, cls._keys_to_ignore_on_load_unexpected = saved


def _same_model(a: str, b: str) -> bool:
    """Two model names (hub ids or local folders) name the same base."""
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.samefile(a, b)
    return a.rstrip("/") == b.rstrip("/")


def _local_adapter_folder(spec: str) -> Path | None:
    """model.adapter's folder when it is local: a run dir's adapter/ or an adapter folder; None for a Hub id."""
    from qtune.rundir import RunDir

    path = Path(spec)
    if RunDir.is_run(path):
        return RunDir.open(path).adapter
    return path if (path / "adapter_config.json").is_file() else None


def start_adapter(recipe: Recipe) -> str | None:
    """model.adapter as the folder (or Hub id) peft loads: a run dir's adapter/, an adapter folder, or a Hub id;
    checked (safetensors, trained on model.name) before any weight loads. None: a fresh adapter."""
    import json

    from qtune.rundir import RunDir

    spec = recipe.model.adapter
    if spec is None:
        return None
    path = Path(spec)
    if RunDir.is_run(path):
        run = RunDir.open(path)
        trained_on, folder = run.recipe.model.name, run.adapter
        where = f"{run.recipe_file} model.name"
    elif (path / "adapter_config.json").is_file():
        folder = path
        if not (path / "adapter_model.safetensors").is_file():
            raise QtuneError(
                f"model.adapter: {path} has no adapter_model.safetensors",
                "qtune loads adapters from safetensors only; convert it with peft (save_pretrained)",
            )
        trained_on = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        where = f"{path / 'adapter_config.json'} base_model_name_or_path"
    elif path.exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise QtuneError(
            f"model.adapter: {spec} is neither a qtune run directory (recipe.yaml + adapter/) nor an adapter folder "
            "(adapter_config.json + adapter_model.safetensors) nor a Hub id (org/name)",
            "give the output_dir of a finished `qtune train`, its adapter/ folder, or a Hub adapter repo",
        )
    else:
        return spec  # a Hub adapter: peft downloads it, and checks it fits when it loads
    task = _adapter_task(folder)
    if task is not None and (task == "SEQ_CLS") != scores(recipe):
        what = "a reward model's (task_type SEQ_CLS, with a score head)" if task == "SEQ_CLS" else f"a {task} adapter"
        raise QtuneError(
            f"model.adapter: {spec} is {what}; method {recipe.method} "
            + ("trains a sequence-classification reward model" if scores(recipe) else "trains a causal LM"),
            "remove model.adapter to start a fresh adapter, or continue an adapter of the same kind",
        )
    if trained_on and not _same_model(trained_on, recipe.model.name):
        raise QtuneError(
            f"model.adapter: {spec} was trained on {trained_on} ({where}), not on model.name {recipe.model.name}",
            "set model.name to the base the adapter was trained on",
        )
    _check_adapter_shapes(recipe, spec, folder)
    return str(folder)


def _adapter_task(folder: Path) -> str | None:
    """The peft task_type an adapter folder was saved with (CAUSAL_LM, SEQ_CLS …), None when it says none."""
    import json

    try:
        return json.loads((Path(folder) / "adapter_config.json").read_text()).get("task_type")
    except (OSError, ValueError):
        return None


def _check_adapter_shapes(recipe: Recipe, spec: str, folder: Path) -> None:
    """The adapter's LoRA matrices fit model.name's layers (read from the safetensors header and the meta model, no
    weights): an adapter trained on another base of the same name (a re-saved or edited local folder) is refused
    naming the first layer whose shape differs."""
    from safetensors import safe_open

    _, meta = _meta_model(recipe)
    modules = dict(meta.named_modules())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    for key, shape in sorted(shapes.items()):
        for part, axis in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in key:
                continue
            name = key.split(part)[0].removeprefix("base_model.model.")
            module = modules.get(name)
            if module is None:
                raise QtuneError(
                    f"model.adapter: {spec} has LoRA weights for {name}, a layer model.name {recipe.model.name} does "
                    f"not have ({type(meta).__name__}): the adapter was trained on another base (LoRA shapes differ; "
                    "the base name matches)",
                    "set model.name to the base the adapter was trained on",
                )
            want = getattr(module, "in_features" if axis else "out_features", None)
            if want is not None and len(shape) == 2 and shape[axis] != want:
                side = "inputs" if axis else "outputs"
                raise QtuneError(
                    f"model.adapter: {spec}: {key.removeprefix('base_model.model.')} has shape {list(shape)}, for "
                    f"{shape[axis]} {side}, but {name} of model.name {recipe.model.name} has {want}: the adapter was "
                    "trained on another base (LoRA shapes differ; the base name matches)",
                    "set model.name to the base the adapter was trained on",
                )


def load_for_training(recipe: Recipe, launch: Launch, tokenizer, verbose: bool = True, allow_pickle: bool = False):
    """The base (load_base), prepared for k-bit training, with a LoRA adapter attached: a PeftModel. The adapter is
    fresh (the lora section), or model.adapter's, loaded trainable (its own LoRA config)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qtune.quant import lora_targets

    m = recipe.model
    # The new score head (reward) and a fresh LoRA adapter of grpo / rloo start from training.seed's draw: the same on
    # every rank and rerun. (The other methods' data checks build a TRL trainer, which seeds the RNG before this;
    # grpo / rloo check their prompts without one, so in one process the draw depended on what ran before.)
    if scores(recipe) or recipe.method in ONLINE_METHODS:
        from transformers import set_seed

        set_seed(recipe.training.seed)
    model = load_base(recipe, launch, allow_pickle=allow_pickle)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    checkpointing = recipe.training.gradient_checkpointing
    ckpt_kwargs = {"use_reentrant": False}
    quantized = recipe.quantization.bits is not None
    # kbit_prepare: False where peft's fp32 upcast would break the backend's weights (quanto: see its entry).
    if quantized and not launch.sharded and backend_of(recipe).kbit_prepare:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    elif checkpointing:
        # Also quanto, and the sharded (FSDP / ZeRO-3) QLoRA path: prepare_model_for_kbit_training would upcast norms and
        # embeddings to fp32 beside 4-bit weights stored in the param dtype, and FSDP flattens each wrapped
        # layer into one tensor of a single dtype (peft's FSDP-QLoRA guide keeps every weight in that dtype).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()

    start = start_adapter(recipe)
    if start is not None:
        model = attach_adapter(model, start, m.name, trainable=True)
        if verbose and launch.is_main:
            trainable, total = model.get_nb_trainable_parameters()
            print(f"qtune: {m.name}: continuing adapter {start} ({trainable:,} trainable parameters)", flush=True)
        return model
    lo = recipe.lora
    lora_config = LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lora_targets(recipe, model),
        bias=lo.bias,
        modules_to_save=lo.modules_to_save,
        use_rslora=lo.use_rslora,
        use_dora=lo.use_dora,
        task_type="SEQ_CLS" if scores(recipe) else "CAUSAL_LM",  # SEQ_CLS: peft trains and saves the score head
    )
    model = get_peft_model(model, lora_config)
    if verbose and launch.is_main:
        trainable, total = model.get_nb_trainable_parameters()
        print(
            f"qtune: {m.name}: {trainable:,} trainable / {total:,} parameters "
            f"({100 * trainable / total:.3f}%), {describe_quantization(recipe)}, on {_describe_device(model)}",
            flush=True,
        )
    return model


def _describe_device(model) -> str:
    devices = sorted({str(p.device) for p in model.parameters()})
    return ", ".join(devices)


def single_process_device_map():
    """Where a one-process command (merge, chat, quantize) puts a model it loads by name: GPU 0, else the CPU."""
    return {"": 0} if _cuda_available() else None


def attach_adapter(model, adapter: os.PathLike, base_name: str, trainable: bool = False):
    """PeftModel.from_pretrained (frozen, eval mode; or trainable, to train on), with a clear error when the adapter
    was trained on another architecture."""
    from peft import PeftModel

    try:
        if trainable:
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise QtuneError(
            f"{adapter}: the adapter does not fit the base model {base_name}: {first}",
            "use the base the adapter was trained on (recipe.yaml model.name, or --base)",
        ) from None


def load_trained(recipe: Recipe, adapter: os.PathLike, base: str | None = None, allow_pickle: bool = False):
    """A trained adapter on its base loaded as in training (load_base), frozen, eval mode."""
    model = load_base(recipe, base=base, allow_pickle=allow_pickle).eval()
    return attach_adapter(model, adapter, base or recipe.model.name)
