"""Memory estimate before a run: from a model config alone (no weights are read or downloaded).

Parameters are counted exactly by building the model on the meta device and splitting the layers
bitsandbytes quantizes (every nn.Linear but the output layer: `qtune.model.linear_modules`) from the rest
(embeddings, norms, lm_head, biases). The byte figures per term (each backend's weight figure is the
`Sizing` of its entry in `qtune.quant.BACKENDS`):

- NF4/FP4 weights: n/2 bytes packed + per tensor the absmax constants, one per block of 64 values:
  fp32 without double quant; with double quant one uint8 per block plus one fp32 per 256 of those, a
  256-entry fp32 code and an fp32 offset. Every 4-bit tensor also keeps its 16-entry fp32 code.
- 8-bit (LLM.int8): n bytes + one fp32 scale per output row. bf16 (no quantization): 2n bytes.
- quanto (`quantization.backend: quanto`, transformers' QuantoConfig; every nn.Linear but the output layer):
  int8: n bytes + one scale per output row in the load dtype; int4: n/2 bytes packed + a scale and a shift
  (load dtype) per group of 128 input values (96, 64 or 32 when 128 does not divide the input; per row when
  the input is ≤ 128 or none divides). Every QLinear also holds two fp32 scalars (input/output scale).
- torchao (`Int8WeightOnlyConfig`; same layers): n int8 + per output row an fp32 scale and an int8 zero point.
- hqq (hqq's `quantize_model`; every linear but `lm_head`): n·bits/8 bytes + a scale and a zero per group of
  `group_size` values (default 64) in the compute dtype, to which hqq casts every other layer too.
- gptq / awq (pre-quantized checkpoints): not modelled; the output says so instead of a figure.
- Non-quantized parts load in the load dtype, then `prepare_model_for_kbit_training` casts them to fp32
  (bitsandbytes): that fp32 figure is what training holds. peft skips that cast for torchao, hqq and gptq
  models, and qtune for quanto (whose weights refuse it), so their non-quantized parts (and so the residual
  stream) stay in the load dtype.
- LoRA: r·(in+out) parameters per targeted linear, fp32 (qtune keeps fp32 master weights), + fp32 grads
  + optimizer state (AdamW 32-bit 8 B/param, 8-bit 2 B/param).
- Activations: see `activation_bytes`. CUDA context: ~0.5 GiB outside torch's allocator (stated apart).
- Preference methods (`METHOD_PASSES`): dpo, orpo and simpo run chosen and rejected through one forward (TRL
  concatenates them), so activations and logits are those of 2 x micro-batch rows; kto runs one completion per row.
  dpo and kto score with TRL's fused LM head (log-probs in tiles: no logits term).
  dpo and kto train against a reference: a second adapter ("ref") on the same base, its LoRA weights in fp32 with
  no gradients or optimizer state, run without grad before the policy's forward (kto also scores its KL
  completions without grad): that pass keeps one layer's activations and its logits at a time, freed before the
  policy's forward, so it adds to the peak only where it is larger than the training activations.
- grpo / rloo (`METHOD_PASSES`, `generation_kv_bytes`): the training forward runs prompt + completion
  (data.max_length, the prompt budget, + max_completion_length) through TRL's fused LM head (no logits term). Before
  it, generation: transformers' `generate` on all of a step's completions at once per device (micro-batch x
  steps_per_generation, TRL's default = grad_accum; TRL's batch sizes count completions, so num_generations changes
  how many distinct prompts they hold, not how many sequences are generated), its KV cache 2 (K, V) x layers x
  kv_heads x head_dim x sequences x (prompt + completion) tokens x bytes, in fp32 after k-bit preparation (TRL
  generates without autocast: the fp32 residual stream makes fp32 keys and values, checked on a 4-bit model), else in
  the compute dtype. The cache is freed before the training forward: only the larger of the two counts in the
  total. Left out: the prefill's transient buffers and each decoding step's logits (sequences x vocab).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from qtune.errors import QtuneError
from qtune.quant import BACKENDS, Storage, offered_bits

GiB = 1024**3
CUDA_CONTEXT = int(0.5 * GiB)

# Offline configs of common base models, addressed by hub id. Instruct/chat variants share the shape.
_LLAMA = {"model_type": "llama", "rms_norm_eps": 1e-5}
_QWEN = {"model_type": "qwen2", "rms_norm_eps": 1e-6}
KNOWN_MODELS: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                                 "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                                 "tie_word_embeddings": False},
    "meta-llama/Llama-2-13b-hf": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                                  "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                                  "tie_word_embeddings": False},
    "meta-llama/Llama-2-70b-hf": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                                  "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                                  "tie_word_embeddings": False},
    "meta-llama/Llama-3.2-1B": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                                "vocab_size": 128256, "tie_word_embeddings": True},
    "meta-llama/Llama-3.2-3B": {**_LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                                "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
                                "vocab_size": 128256, "tie_word_embeddings": True},
    "meta-llama/Llama-3.1-8B": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                "tie_word_embeddings": False},
    "meta-llama/Llama-3.1-70B": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                                 "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                                 "tie_word_embeddings": False},
    "mistralai/Mistral-7B-v0.1": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                  "vocab_size": 32000, "tie_word_embeddings": False},
    "mistralai/Mistral-7B-v0.3": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                  "vocab_size": 32768, "tie_word_embeddings": False},
    "Qwen/Qwen2.5-0.5B": {**_QWEN, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                          "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                          "tie_word_embeddings": True},
    "Qwen/Qwen2.5-1.5B": {**_QWEN, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                          "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                          "tie_word_embeddings": True},
    "Qwen/Qwen2.5-3B": {**_QWEN, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                        "tie_word_embeddings": True},
    "Qwen/Qwen2.5-7B": {**_QWEN, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                        "tie_word_embeddings": False},
    "Qwen/Qwen2.5-14B": {**_QWEN, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
                         "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
                         "tie_word_embeddings": False},
    "Qwen/Qwen2.5-32B": {**_QWEN, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
                         "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
                         "tie_word_embeddings": False},
    "Qwen/Qwen2.5-72B": {**_QWEN, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                         "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
                         "tie_word_embeddings": False},
    "google/gemma-2-2b": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                          "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                          "vocab_size": 256000, "tie_word_embeddings": True},
    "google/gemma-2-9b": {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
                          "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
                          "head_dim": 256, "vocab_size": 256000, "tie_word_embeddings": True},
    "google/gemma-2-27b": {"model_type": "gemma2", "hidden_size": 4608, "intermediate_size": 36864,
                           "num_hidden_layers": 46, "num_attention_heads": 32, "num_key_value_heads": 16,
                           "head_dim": 128, "vocab_size": 256000, "tie_word_embeddings": True},
    "microsoft/Phi-3-mini-4k-instruct": {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                                         "num_hidden_layers": 32, "num_attention_heads": 32,
                                         "num_key_value_heads": 32, "vocab_size": 32064,
                                         "tie_word_embeddings": False},
    "microsoft/Phi-3-medium-4k-instruct": {"model_type": "phi3", "hidden_size": 5120, "intermediate_size": 17920,
                                           "num_hidden_layers": 40, "num_attention_heads": 40,
                                           "num_key_value_heads": 10, "vocab_size": 32064,
                                           "tie_word_embeddings": False},
}  # fmt: skip
# Other hub ids with one of the shapes above.
ALIASES = {
    "meta-llama/Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-hf",
    "meta-llama/Llama-2-70b-chat-hf": "meta-llama/Llama-2-70b-hf",
    "meta-llama/Meta-Llama-3-8B": "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3-70B": "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-3.3-70B-Instruct": "meta-llama/Llama-3.1-70B",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistralai/Mistral-7B-v0.1",
    "microsoft/Phi-3-mini-128k-instruct": "microsoft/Phi-3-mini-4k-instruct",
    "microsoft/Phi-3-medium-128k-instruct": "microsoft/Phi-3-medium-4k-instruct",
}


def known_names() -> list[str]:
    return sorted(KNOWN_MODELS, key=str.lower)


def _table_entry(name: str) -> dict | None:
    key = ALIASES.get(name, name)
    for suffix in ("", "-Instruct", "-it"):  # meta-llama/Llama-3.1-8B-Instruct, google/gemma-2-9b-it …
        if suffix and key.endswith(suffix):
            key = key[: -len(suffix)]
        lowered = {k.lower(): v for k, v in KNOWN_MODELS.items()}
        if key.lower() in lowered:
            return lowered[key.lower()]
    return None


def model_config(name: str, trust_remote_code: bool = False):
    """A transformers config for a hub id in the offline table, a local folder, a config.json, or (with network
    access or a filled cache) any hub id."""
    from transformers import AutoConfig

    entry = _table_entry(name)
    if entry is not None:
        fields = dict(entry)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(name)
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if "model_type" not in data:
            raise QtuneError(f"{name}: no 'model_type' in this config file", "pass a transformers config.json")
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        raise QtuneError(
            f"unknown model '{name}': not in qtune's offline table, not a local folder or config.json, and its "
            "config could not be fetched",
            "pass a local model folder or its config.json (--model path/to/config.json), or one of: "
            + ", ".join(known_names()),
        ) from None


@dataclass
class Shape:
    """What the estimate needs from the model, counted on the meta device."""

    model_type: str
    linears: list[tuple[str, int, int]]  # (name, in_features, out_features) of the quantizable layers
    other_params: int  # embeddings, norms, lm_head, biases (counted once when tied)
    buffer_bytes: int  # rotary tables etc. (kept in their own dtype)
    hidden: int
    intermediate: int
    layers: int
    q_dim: int
    kv_dim: int
    vocab: int

    @property
    def quantizable(self) -> int:
        return sum(i * o for _, i, o in self.linears)

    @property
    def total_params(self) -> int:
        return self.quantizable + self.other_params


def model_shape(config, trust_remote_code: bool = False) -> Shape:
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.model import linear_modules

    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise QtuneError(
            f"model_type {config.model_type} is not a causal language model transformers can build: "
            f"{str(exc).splitlines()[0]}",
            "qtune estimates decoder LMs (Llama, Mistral, Qwen2, Gemma, Phi …)",
        ) from None
    names = set(linear_modules(meta))
    modules = dict(meta.named_modules())
    linears = []
    quantized_ids = set()
    for name in sorted(names):
        w = modules[name].weight
        out_f, in_f = (w.shape[0], w.shape[1]) if isinstance(modules[name], torch.nn.Linear) else w.shape[::-1]
        linears.append((name, int(in_f), int(out_f)))
        quantized_ids.add(id(w))
    other = sum(p.numel() for p in meta.parameters() if id(p) not in quantized_ids)  # parameters() dedups ties
    buffers = sum(b.numel() * b.element_size() for b in meta.buffers())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return Shape(
        model_type=config.model_type,
        linears=linears,
        other_params=int(other),
        buffer_bytes=int(buffers),
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        layers=text.num_hidden_layers,
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        vocab=text.vocab_size,
    )


def quantized_bytes(shape: Shape, bits: int | None, double_quant: bool = True, load_bytes: int = 2,
                    backend: str = "bnb", group_size: int | None = None) -> int | None:  # fmt: skip
    """Bytes of the quantizable linears' weights as the backend stores them (constants included; its `Sizing` in
    qtune.quant); None for a backend that is not modelled."""
    if bits is None:
        return sum(i * o * load_bytes for _, i, o in shape.linears)
    sizing = BACKENDS[backend].sizing
    if sizing is None:
        return None
    storage = Storage(bits, double_quant, load_bytes, group_size)
    return sum(sizing.layer_bytes(i, o, storage) for _, i, o in shape.linears)


OPTIMIZER_BYTES = (  # optimizer state bytes per trainable parameter, by optimizer name (first match)
    (re.compile(r"8bit"), 2, "two 8-bit moments"),
    (re.compile(r"lion"), 4, "one fp32 moment"),
    (re.compile(r"adafactor"), 1, "factored second moment (≈ rows + cols)"),
    (re.compile(r"sgd"), 4, "fp32 momentum (at most)"),
    (re.compile(r"adam|lamb|ademamix|lomo|.*"), 8, "two fp32 moments"),
)


def optimizer_state(name: str) -> tuple[int, str]:
    for pattern, per_param, what in OPTIMIZER_BYTES:
        if pattern.search(name):
            return per_param, what
    return 8, "two fp32 moments"


@dataclass(frozen=True)
class Passes:
    """How a training method's step runs its forward passes (what the memory terms scale with)."""

    rows: int  # sequences per example in the forward with grad (chosen + rejected: 2)
    reference: bool  # a frozen reference adapter on the same base, run without grad
    no_grad_rows: int  # sequences per example in the no-grad forwards (reference; kto's KL completions)
    what: str
    fused_head: bool = False  # TRL's fused LM head (trl.trainer.utils.add_fused_lm_head): no full logits kept


METHOD_PASSES = {
    "sft": Passes(1, False, 0, "one sequence per example"),
    "dpo": Passes(
        2, True, 2, "chosen + rejected in one forward (2 rows per pair); reference forward without grad", True
    ),
    "kto": Passes(
        1, True, 2, "one completion per row, plus its KL completion and the reference forward, both without grad", True
    ),
    "orpo": Passes(2, False, 0, "chosen + rejected in one forward (2 rows per pair); no reference"),
    "simpo": Passes(2, False, 0, "chosen + rejected in one forward (2 rows per pair); no reference"),
    "grpo": Passes(1, False, 0, "generates its completions, then trains on prompt + completion", True),
    "rloo": Passes(1, False, 0, "generates its completions, then trains on prompt + completion", True),
}
ONLINE = ("grpo", "rloo")


def generation_kv_bytes(shape: Shape, sequences: int, tokens: int, element_bytes: int) -> int:
    """The KV cache of `sequences` generated together, each `tokens` long (prompt + completion): keys and values of
    every layer, kv_heads x head_dim wide."""
    return 2 * shape.layers * shape.kv_dim * sequences * tokens * element_bytes


def lora_params(shape: Shape, r: int, targets) -> int:
    chosen = shape.linears if targets == "all-linear" else [
        (n, i, o) for n, i, o in shape.linears if n.rsplit(".", 1)[-1] in set(targets)
    ]  # fmt: skip
    return sum(r * (i + o) for _, i, o in chosen)


def activation_bytes(shape: Shape, batch: int, length: int, checkpointing: bool, compute_bytes: int, r: int,
                     dropout: bool, residual_bytes: int = 4, fused_head: bool = False) -> dict[str, int]:  # fmt: skip
    """Saved activations at the start of backward (the peak), for full-length rows.

    Per decoder layer, b·s times: p·(3q + 3kv + 2h + 4i) [q, k, v and their rotary copies, attention output,
    o_proj and down_proj outputs, MLP gate, up, act(gate), act·up] + 16h [the two RMSNorms, fp32 after k-bit
    preparation: fp32 input and output each] + p·(5h + q + i) when LoRA dropout > 0 [a dropped copy of each
    adapted layer's input] + p·7r [LoRA A outputs]. Attention itself is sdpa/flash: no s² matrix is kept.
    Logits: b·s·V·(p + 4 + 4): the lm_head output, its fp32 upcast for the loss and the fp32 log-softmax the
    cross-entropy keeps for backward.
    Without checkpointing every layer keeps its activations and all of it is alive, with the logits, when backward
    starts: L·layer + logits. With checkpointing each layer keeps only its input (the residual stream, c·b·s·h:
    c = 4, fp32 after k-bit preparation; c = p where the embeddings stay in the load dtype, `residual_bytes`) and
    the peak is the larger of the logits (at the start of backward) and one layer recomputed during backward (the
    logits are freed by then): L·c·b·s·h + max(logits, layer). The "layers" term below then holds
    L·c·b·s·h + max(0, layer − logits), so that the two terms add up to that peak.
    """
    b, s, p, h = batch, length, compute_bytes, shape.hidden
    per_layer = b * s * (p * (3 * shape.q_dim + 3 * shape.kv_dim + 2 * h + 4 * shape.intermediate) + 16 * h)
    per_layer += b * s * p * 7 * r
    if dropout:
        per_layer += b * s * p * (5 * h + shape.q_dim + shape.intermediate)
    logits = 0 if fused_head else b * s * shape.vocab * (p + 8)  # fused: log-probs in tiles, no full logits
    if checkpointing:
        layers = shape.layers * b * s * h * residual_bytes + max(0, per_layer - logits)
    else:
        layers = shape.layers * per_layer
    return {"layers": layers, "logits": logits, "per_layer": per_layer}


@dataclass
class Estimate:
    name: str
    shape: Shape
    bits: int | None
    double_quant: bool
    load_bytes: int
    compute_bytes: int
    lora_r: int
    lora_targets: object
    lora_dropout: bool
    optimizer: str
    batch: int
    length: int
    checkpointing: bool
    gpu_bytes: int | None = None
    gpus: int = 1
    backend: str = "bnb"
    group_size: int | None = None  # hqq's quantization group (None: hqq's default, 64)
    method: str = "sft"  # the training method (METHOD_PASSES): preference methods double rows or add a reference
    completion: int = 0  # grpo / rloo: max_completion_length (the training sequence is length + completion)
    generation_rows: int = (
        0  # grpo / rloo: sequences generated together per device (micro-batch x steps per generation)
    )
    reference_copy: bool = False  # grpo / rloo with beta > 0 and model.adapter: TRL's frozen "ref" copy of the adapter
    terms: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        s = self.shape
        quantized = quantized_bytes(s, self.bits, self.double_quant, self.load_bytes, self.backend, self.group_size)
        self.modelled = quantized is not None  # False: gptq / awq, whose weights the figures below leave out
        self.quantized = quantized or 0
        self.other_loaded = s.other_params * self.load_bytes + s.buffer_bytes
        # prepare_model_for_kbit_training casts the non-quantized parameters to fp32 (quantized models only, and
        # only where the backend's entry says the cast runs: bnb; peft leaves torchao / hqq / gptq as loaded).
        self.upcast = bool(self.bits) and BACKENDS[self.backend].upcast
        self.other_training = s.other_params * (4 if self.upcast else self.load_bytes) + s.buffer_bytes
        self.lora = lora_params(s, self.lora_r, self.lora_targets)
        self.opt_per_param, self.opt_what = optimizer_state(self.optimizer)
        self.passes = METHOD_PASSES.get(self.method, METHOD_PASSES["sft"])
        self.rows = self.batch * self.passes.rows  # sequences in the forward with grad
        self.sequence = self.length + (self.completion if self.method in ONLINE else 0)  # tokens per trained row
        run = (self.compute_bytes, self.lora_r, self.lora_dropout, 4 if self.upcast else self.compute_bytes,
               self.passes.fused_head)  # fmt: skip
        acts = activation_bytes(s, self.rows, self.sequence, self.checkpointing, *run)
        other_acts = activation_bytes(s, self.rows, self.sequence, not self.checkpointing, *run)
        self.acts_other_mode = other_acts["layers"] + other_acts["logits"]
        # the no-grad forwards (reference, kto's KL): one layer's activations and the logits of their rows at a time
        no_grad = activation_bytes(s, self.batch * self.passes.no_grad_rows, self.length, False, *run)
        self.no_grad_peak = (no_grad["per_layer"] + no_grad["logits"]) if self.passes.no_grad_rows else 0
        self.terms = {
            "quantized weights": self.quantized,
            "non-quantized parts": self.other_training,
            "LoRA weights": self.lora * 4,
            "LoRA gradients": self.lora * 4,
            "optimizer state": self.lora * self.opt_per_param,
            **({"reference adapter": self.lora * 4} if self.passes.reference else {}),
            "activations (layers)": acts["layers"],
            "logits + loss": acts["logits"],
        }
        if self.no_grad_peak > acts["layers"] + acts["logits"]:
            self.terms["no-grad forward"] = self.no_grad_peak - acts["layers"] - acts["logits"]
        self.per_layer = acts["per_layer"]
        # grpo / rloo: generation's KV cache (fp32 after k-bit preparation: TRL generates without autocast), held
        # before the training forward and freed by then: the total counts the larger of it and the activations
        self.kv_bytes_per_value = 4 if self.upcast else self.compute_bytes
        self.generation = (
            generation_kv_bytes(s, self.generation_rows or self.batch, self.sequence, self.kv_bytes_per_value)
            if self.method in ONLINE
            else 0
        )
        self.training_acts = acts["layers"] + acts["logits"]
        if self.method in ONLINE:
            if self.reference_copy:
                self.terms["reference adapter"] = self.lora * 4
            self.terms["generation (KV cache)"] = self.generation

    @property
    def weights_loaded(self) -> int:
        return self.quantized + self.other_loaded

    @property
    def allocated(self) -> int:
        """The peak: every term, but generation's KV cache and the training activations never together (the larger)."""
        return sum(self.terms.values()) - min(self.generation, self.training_acts)

    @property
    def total(self) -> int:
        return self.allocated + CUDA_CONTEXT

    @property
    def simple_rule(self) -> float:
        """The seed's rule of thumb: parameters × bits / 8 × 1.2."""
        return self.shape.total_params * (self.bits or 16) / 8 * 1.2

    def sharded(self, n: int) -> int:
        """Per-GPU bytes under FSDP / ZeRO-3 over n GPUs: weights, adapter, grads and optimizer state sharded,
        two decoder layers gathered at a time (the current one and the prefetched next), activations per GPU."""
        t = self.terms
        per_gpu = ("activations", "logits", "no-grad", "generation")
        states = sum(v for k, v in t.items() if not k.startswith(per_gpu))
        acts = sum(v for k, v in t.items() if k.startswith(per_gpu)) - min(self.generation, self.training_acts)
        layer = self.quantized / max(self.shape.layers, 1)
        return math.ceil(states / n) + int(2 * layer) + acts + CUDA_CONTEXT

    def verdict(self) -> QtuneError | None:
        """The error for a run that cannot fit --gpu, naming the largest term and what to change; None otherwise."""
        if not self.gpu_bytes:
            return None
        per_gpu = self.total if self.gpus == 1 else min(self.total, self.sharded(self.gpus))
        if per_gpu <= self.gpu_bytes:
            return None  # without a weight figure (gptq / awq) render says the verdict is unknown
        top = self.dominant()
        needs = "~" if self.modelled else f"at least (without its {self.backend} weights) "
        return QtuneError(
            f"{self.name} needs {needs}{_gib(per_gpu)} GiB per GPU, more than --gpu {_gib(self.gpu_bytes)} GiB; "
            f"the largest term is {top} ({_gib(self.terms[top])} GiB)",
            self.advice(),
        )

    def dominant(self) -> str:
        return max(self.terms, key=self.terms.get)

    def advice(self) -> str:
        top = self.dominant()
        if top in ("activations (layers)", "logits + loss"):
            parts = [f"lower training.micro_batch_size (now {self.batch}; raise grad_accum to keep the batch)",
                     f"or data.max_length (now {self.length})"]  # fmt: skip
            if not self.checkpointing:
                parts.append(
                    f"or turn on training.gradient_checkpointing (activations then {_gib(self.acts_other_mode)} GiB)"
                )
            return ", ".join(parts)
        if top == "optimizer state":
            return "use an 8-bit optimizer (training.optimizer: paged_adamw_8bit) or a smaller lora.r"
        if self.bits != 4:
            backend = ""
            if 4 not in BACKENDS[self.backend].bits:  # e.g. torchao (8 only): name those that offer 4 and are sized
                four = [b.name for b in BACKENDS.values() if 4 in b.bits and b.sizing and not b.refused]
                backend = f" with backend {', '.join(four[:-1])} or {four[-1]}"
            return f"quantize to 4 bits (quantization.bits: 4{backend}), or shard over several GPUs (FSDP)"
        return "a smaller model, or shard the weights over several GPUs (FSDP-QLoRA)"

    def render(self) -> str:
        s = self.shape
        lines = [
            f"qtune estimate: {self.name} ({s.model_type}), {self.quant_name()}",
            f"  parameters      {s.total_params:,} ({s.quantizable:,} in {len(s.linears)} quantizable linears, "
            f"{s.other_params:,} other: embeddings, norms, lm_head, biases)",
            f"  run             micro-batch {self.batch} x "
            + (f"(max_length {self.length} + completion {self.completion} = {self.sequence} tokens)"
               if self.method in ONLINE else f"max_length {self.length}")
            + ", gradient checkpointing "
            f"{'on' if self.checkpointing else 'off'}, LoRA r {self.lora_r} on {self._targets()}, "
            f"{self.optimizer}",
            *(
                [f"  method          {self.method}: {self.passes.what}; generation: {self.generation_rows or self.batch}"
                 f" sequences at once per device (micro-batch x steps per generation; TRL counts completions, so "
                 f"num_generations sets how many distinct prompts they hold), KV cache counted below"]
                if self.method in ONLINE
                else [f"  method          {self.method}: {self.passes.what}" + (
                    "; the reference is a second adapter on the same base (its LoRA weights, no gradients or "
                    "optimizer state)" if self.passes.reference else "")]
                if self.method != "sft"
                else []
            ),
            "",
            f"  {'term':<24}{'GiB':>9}  how",
        ]  # fmt: skip
        hows = {
            "quantized weights": self._quant_how(),
            "non-quantized parts": f"{s.other_params:,} x " + (
                f"4 B (fp32 after prepare_model_for_kbit_training; {_gib(self.other_loaded)} GiB as loaded)"
                if self.upcast
                else f"{self.load_bytes} B" + (f" (peft does not upcast {self.backend} models)" if self.bits else "")
            ),
            "LoRA weights": f"{self.lora:,} params x 4 B (fp32)",
            "LoRA gradients": f"{self.lora:,} x 4 B",
            "optimizer state": f"{self.lora:,} x {self.opt_per_param} B ({self.opt_what})",
            "activations (layers)": (
                f"{s.layers} layer inputs x {4 if self.upcast else self.compute_bytes}·b·s·h; one layer recomputed "
                f"({_gib(self.per_layer)} GiB) overlaps the logits, the larger counts"
                if self.checkpointing
                else f"{s.layers} layers x {_gib(self.per_layer)} GiB"
            )
            + f"; checkpointing {'off' if self.checkpointing else 'on'}: {_gib(self.acts_other_mode)} GiB incl. logits",
            "logits + loss": f"b·s·vocab·(p+4+4), vocab {s.vocab:,}",
            "reference adapter": f"{self.lora:,} params x 4 B (fp32, frozen: no gradients, no optimizer state)",
            "no-grad forward": f"{_gib(self.no_grad_peak)} GiB at its peak (one layer + logits of "
            f"{self.batch * self.passes.no_grad_rows} rows): above the training activations by this much",
            "generation (KV cache)": self._generation_how(),
        }  # fmt: skip
        if self.reference_copy:
            hows["reference adapter"] += "; TRL's copy of model.adapter, the KL reference (beta > 0)"
        if self.passes.rows > 1:
            for key in ("activations (layers)", "logits + loss"):
                hows[key] += (
                    f"; b = {self.rows} rows (micro-batch {self.batch} x {self.passes.rows}: chosen + rejected)"
                )
        if self.passes.fused_head:
            hows["logits + loss"] = (
                "none kept: TRL's fused LM head scores the completion tokens in tiles, no (rows, length, vocab) logits"
            )
            hows["activations (layers)"] = hows["activations (layers)"].replace(
                "overlaps the logits, the larger counts", "on top (no logits to overlap)"
            )
        for key, value in self.terms.items():
            figure = _gib(value) if self.modelled or key != "quantized weights" else "n/a"
            lines.append(f"  {key:<24}{figure:>9}  {hows[key]}")
        if not self.modelled:
            lines.append(f"  (the figures below leave out the {self.backend} weights)")
        if self.method in ONLINE:
            lines.append(
                f"  (generation's KV cache is freed before the training forward: the total counts only the larger of it "
                f"and the activations + logits, {_gib(max(self.generation, self.training_acts))} GiB)"
            )
        if self.passes.no_grad_rows and "no-grad forward" not in self.terms:
            lines.append(
                f"  (the no-grad forward{'s' if self.method == 'kto' else ''} of the "
                f"{'reference and KL completions' if self.method == 'kto' else 'reference'}: "
                f"{_gib(self.no_grad_peak)} GiB at {'their' if self.method == 'kto' else 'its'} peak, before the policy's forward: below the training "
                "activations, so not added)"
            )
        lines += [
            f"  {'allocated (torch)':<24}{_gib(self.allocated):>9}  compare with torch.cuda.max_memory_allocated",
            f"  {'CUDA context':<24}{_gib(CUDA_CONTEXT):>9}  ~0.5 GiB per process, outside torch's allocator",
            f"  {'total per GPU':<24}{_gib(self.total):>9}  plus allocator slack (reserved > allocated)",
            "",
            f"  weights as loaded    {_gib(self.weights_loaded)} GiB ({self.weights_loaded / 1e9:.2f} GB): "
            + (
                "quantized + non-quantized in the load dtype"
                if self.modelled
                else f"the non-quantized parts only, in the load dtype (no {self.backend} weights)"
            ),
            f"  simple rule          {_gib(self.simple_rule)} GiB: {s.total_params / 1e9:.2f}B params x "
            f"{self.bits or 16} bits / 8 x 1.2 (weights only, the seed's rule of thumb)",
        ]
        if self.gpus > 1:
            lines += [
                f"  {self.gpus} GPUs, per GPU:  DDP {_gib(self.total)} GiB (a full replica each)   "
                f"FSDP / ZeRO-3 {_gib(self.sharded(self.gpus))} GiB (states sharded, 2 layers gathered; "
                "qtune trains DDP today)",
            ]
        if self.gpu_bytes:
            per_gpu = self.total if self.gpus == 1 else min(self.total, self.sharded(self.gpus))
            lines.append("")
            if not self.modelled and per_gpu <= self.gpu_bytes:
                lines.append(f"  verdict: unknown: the {self.backend} weights are not modelled")
            elif self.total <= self.gpu_bytes:
                lines.append(
                    f"  verdict: fits in {_gib(self.gpu_bytes)} GiB ({_gib(self.gpu_bytes - self.total)} GiB to spare)"
                )
            elif per_gpu <= self.gpu_bytes:
                lines.append(
                    f"  verdict: one replica ({_gib(self.total)} GiB) does not fit {_gib(self.gpu_bytes)} GiB; "
                    f"sharded over {self.gpus} GPUs (FSDP / ZeRO-3) it would ({_gib(per_gpu)} GiB per GPU)"
                )
            else:
                lines.append(
                    f"  verdict: does NOT fit in {_gib(self.gpu_bytes)} GiB (needs {_gib(per_gpu)} GiB per GPU)"
                )
        return "\n".join(lines)

    def _generation_how(self) -> str:
        s, rows = self.shape, self.generation_rows or self.batch
        return (
            f"2 (K, V) x {s.layers} layers x {s.kv_dim} (kv_heads x head_dim) x {rows} sequences x {self.sequence} "
            f"tokens (prompt {self.length} + completion {self.completion}) x {self.kv_bytes_per_value} B"
            + (" (fp32: generation runs without autocast after k-bit preparation)" if self.kv_bytes_per_value == 4
               and self.upcast else "")
        )  # fmt: skip

    def _targets(self) -> str:
        return "all linear layers" if self.lora_targets == "all-linear" else ", ".join(self.lora_targets)

    def _storage(self) -> Storage:
        return Storage(self.bits, self.double_quant, self.load_bytes, self.group_size)

    def quant_name(self) -> str:
        """The quantization sized, naming its backend."""
        if self.bits is None:
            return "bf16/fp16 (no quantization)"
        sizing = BACKENDS[self.backend].sizing
        if sizing is None:
            return f"{self.bits}-bit {self.backend} (its weight bytes are not modelled)"
        return sizing.name(self._storage())

    def _quant_how(self) -> str:
        n = self.shape.quantizable
        if not self.modelled:
            return f"{n:,} params: qtune does not model {self.backend} checkpoints' storage (no figure)"
        if self.bits is None:
            return f"{n:,} x {self.load_bytes} B"
        return BACKENDS[self.backend].sizing.how(n, self._storage())


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def parse_size(text: str) -> int:
    """'24GB', '24GiB', '80G', '24' → bytes; GB counts as GiB, as GPU makers' figures mean."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib)?\s*", text.lower())
    if not m:
        raise QtuneError(f"--gpu {text!r} is not a memory size", "e.g. --gpu 24GB or --gpu 80GiB")
    scale = GiB if (m.group(2) or "g").startswith("g") else 1024**2
    return int(float(m.group(1)) * scale)


def estimate(
    name: str,
    bits: int | None = 4,
    double_quant: bool = True,
    dtype: str = "bfloat16",
    lora_r: int = 16,
    lora_targets="all-linear",
    lora_dropout: bool = True,
    optimizer: str = "adamw_torch",
    batch: int = 4,
    length: int = 2048,
    checkpointing: bool = True,
    gpu: str | None = None,
    gpus: int = 1,
    trust_remote_code: bool = False,
    backend: str = "bnb",
    group_size: int | None = None,
    method: str = "sft",
    completion: int | None = None,
    steps_per_generation: int = 1,
    reference_copy: bool = False,
) -> Estimate:
    """The estimate for a model name / folder / config.json and the run's settings (GPU training figures). grpo / rloo:
    `length` is the prompt budget, `completion` the max_completion_length (default 256, qtune's), and each device
    generates batch x steps_per_generation sequences at once (TRL's default steps_per_generation: grad_accum)."""
    if batch < 1 or length < 1 or lora_r < 1 or gpus < 1 or steps_per_generation < 1 or (completion or 1) < 1:
        raise QtuneError("--micro-batch, --max-length, --lora-r, --gpus and --max-completion-length must be positive")
    online = method in ("grpo", "rloo")
    offered = offered_bits(BACKENDS[backend])
    if bits is not None and bits not in offered:
        raise QtuneError(
            f"quantization.backend {backend} does not offer {bits}-bit weights",
            f"it offers: {', '.join(map(str, offered))}",
        )
    load_bytes = 4 if dtype in ("float32", "fp32") else 2
    shape = model_shape(model_config(name, trust_remote_code), trust_remote_code)
    if lora_targets != "all-linear":
        leaves = {n.rsplit(".", 1)[-1] for n, _, _ in shape.linears}
        missing = [t for t in lora_targets if t not in leaves]
        if missing:
            raise QtuneError(
                f"lora.target_modules: {', '.join(missing)} is not a linear layer of {name}",
                f"linear layers: {', '.join(sorted(leaves))}",
            )
    return Estimate(
        name=name,
        shape=shape,
        bits=bits,
        double_quant=double_quant,
        load_bytes=load_bytes,
        compute_bytes=load_bytes,
        lora_r=lora_r,
        lora_targets=lora_targets,
        lora_dropout=lora_dropout,
        optimizer=optimizer,
        batch=batch,
        length=length,
        checkpointing=checkpointing,
        gpu_bytes=parse_size(gpu) if gpu else None,
        gpus=gpus,
        backend=backend,
        group_size=group_size,
        method=method,
        completion=(completion or 256) if online else 0,
        generation_rows=batch * steps_per_generation if online else 0,
        reference_copy=reference_copy and online,
    )


def from_recipe(recipe, **overrides) -> Estimate:
    """The estimate for a recipe's model and settings; keyword overrides (from the command line) win."""
    q = recipe.quantization
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else "bfloat16"  # the GPU figure
    sizing = BACKENDS[q.backend].sizing
    if sizing and sizing.compute_dtype_casts_all and q.compute_dtype != "auto":
        dtype = q.compute_dtype  # hqq casts the whole model (its scales and zeros too) to the compute dtype
    settings = dict(
        bits=q.bits,
        double_quant=q.double_quant,
        dtype=dtype,
        lora_r=recipe.lora.r,
        lora_targets=recipe.lora.target_modules,
        lora_dropout=recipe.lora.dropout > 0,
        optimizer=recipe.training.optimizer,
        batch=recipe.training.micro_batch_size,
        length=recipe.data.max_length,
        checkpointing=recipe.training.gradient_checkpointing,
        trust_remote_code=recipe.model.trust_remote_code,
        backend=q.backend,
        group_size=getattr(q, "group_size", None),  # hqq's, where the recipe has the key (else hqq's 64)
        method=recipe.method,
    )
    settings.update({k: v for k, v in overrides.items() if v is not None or k == "bits"})  # bits None: --bits 16
    section = getattr(recipe, settings["method"], None) if settings["method"] in ("grpo", "rloo") else None
    if section is not None:  # the recipe's grpo / rloo settings (a --method grpo on an sft recipe: the defaults)
        extra = recipe.training.extra
        steps = extra.get("steps_per_generation") or recipe.training.grad_accum  # TRL's default: grad_accum
        if extra.get("generation_batch_size"):  # completions per generation over all processes
            steps = max(1, extra["generation_batch_size"] // (settings["batch"] * settings.get("gpus", 1)))
        settings.setdefault("completion", section.max_completion_length)
        settings.update(steps_per_generation=steps,
                        reference_copy=bool(section.beta and recipe.model.adapter))  # fmt: skip
    return estimate(recipe.model.name, **settings)


def probe(recipe_path: str, overrides: list[str] = ()) -> dict:
    """Run one real optimizer step of the recipe through qtune's own pipeline (its checks, loading, data and
    TRL trainer) into a temporary output dir and return the measured peak memory: torch's peak allocated /
    reserved on a GPU, the peak resident set of the process on the CPU."""
    import contextlib
    import io
    import tempfile

    from qtune import pipeline
    from qtune.config import load_recipe
    from qtune.monitor import peak_memory_bytes

    with tempfile.TemporaryDirectory(prefix="qtune-probe-") as tmp:
        one_step = [
            "training.max_steps=1",
            f"output_dir={tmp}/run",
            "training.resume=false",
            "training.overwrite=false",
            "tracking.backend=none",
            "hub.push=false",
            "training.save_steps=null",
            "training.eval_steps=null",
            "data.eval_split=null",
        ]
        prepared = pipeline.prepare(load_recipe(recipe_path, [*overrides, *one_step]))
        import torch

        gpu = torch.cuda.is_available()
        rss_before = peak_memory_bytes().get("rss", 0)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        with contextlib.redirect_stdout(io.StringIO()):  # the step's run summary is not what the user asked for
            pipeline.train(prepared, quiet=True)
        peak = peak_memory_bytes()
        if gpu:
            return {
                "device": torch.cuda.get_device_name(),
                "peak_allocated": peak["allocated"],
                "peak_reserved": peak["reserved"],
            }
        return {"device": "cpu", "peak_rss": peak["rss"], "rss_before_load": rss_before}


def render_probe(measured: dict, est: Estimate) -> str:
    if "peak_allocated" in measured:
        alloc = measured["peak_allocated"]
        return (
            f"  probe ({measured['device']}, 1 training step): peak allocated {_gib(alloc)} GiB, reserved "
            f"{_gib(measured['peak_reserved'])} GiB; estimate {_gib(est.allocated)} GiB allocated "
            f"({100 * (est.allocated - alloc) / alloc:+.0f}%)"
        )
    return (
        f"  probe (CPU, 1 training step): peak RSS {_gib(measured['peak_rss'])} GiB for the whole process (Python, "
        f"torch and libraries: {_gib(measured['rss_before_load'])} GiB before the model loaded); CPU resident "
        "memory is not GPU memory: the estimate above is for a GPU run (bf16 unless model.dtype says otherwise)"
    )
