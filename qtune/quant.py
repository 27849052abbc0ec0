"""The quantization backends: one `Backend` entry per library in `BACKENDS`, and what every entry needs (the
transformers config it loads with, how estimate sizes its weights, how merge dequantizes its layers).

Everything else asks the table (`backend_of(recipe)`, `BACKENDS[name]`) instead of testing a backend's name:
adding a backend adds an entry here (and its tests). bitsandbytes is the default; with backend gptq the base is a
GPTQ checkpoint, loaded as it was saved (qtune does not quantize it). This module imports neither torch nor
transformers at module level (`qtune.config` reads the table; `qtune --help` stays fast)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports this module for the table: a runtime import would be a cycle
    from qtune.config import QuantizationSection, Recipe


def resolve_dtype(name: str):
    """'auto' → bfloat16 on a GPU that supports it, else float32; other names map to torch dtypes."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


@dataclass(frozen=True)
class Storage:
    """What `qtune estimate` knows of how the quantized linears will be stored."""

    bits: int
    double_quant: bool = True  # bnb 4-bit: the absmax constants quantized too
    load_bytes: int = 2  # bytes per value of the load dtype (quanto's and hqq's scales are in it)
    group_size: int | None = None  # hqq's quantization group (None: HQQ_GROUP_SIZE)


@dataclass(frozen=True)
class Sizing:
    """How `qtune estimate` sizes a backend's weights (exactly: tests/test_estimate.py compares with real models)."""

    layer_bytes: Callable[[int, int, Storage], int]  # one (in, out) linear's weight bytes, constants included
    name: Callable[[Storage], str]  # the quantization sized, naming the backend ("int8 weights (quanto)")
    how: Callable[[int, Storage], str]  # how n quantized params are stored, for the estimate's table
    compute_dtype_casts_all: bool = False  # the backend casts the whole model to the compute dtype (hqq)


@dataclass(frozen=True)
class Backend:
    """One quantization library: everything qtune does differently for it."""

    name: str  # quantization.backend
    library: str  # what it is called in messages
    doc: str  # its part of the quantization.backend key's description
    bits: tuple[int | None, ...]  # quantization.bits it offers for LoRA training (None: plain LoRA, bnb only)
    describe: Callable[[QuantizationSection], str]  # one phrase for logs and the model card
    config: Callable[..., object] | None = None  # (recipe, launch) → transformers' quantization config
    modules: tuple[str, ...] = ()  # modules that must import (checked before any weight loads)
    extra: str | None = None  # pip extra that installs them: qtune[extra]
    refused: tuple[str, str] | None = None  # (error, hint): not offered, said at start
    keys: tuple[str, ...] = ()  # quantization keys besides bits and backend that it reads
    checkpoint: str | None = None  # quant_method of the pre-quantized checkpoint it trains on (None: quantizes itself)
    after_load: Callable[[Recipe, object], object] | None = None  # quantizes a model loaded unquantized
    kbit_prepare: bool = True  # qtune calls peft's prepare_model_for_kbit_training on the quantized base
    upcast: bool = False  # ... and peft's fp32 cast of the non-quantized parts runs in it (training holds fp32)
    quantized_layer: Callable[[], type] | None = None  # its layer class, where peft's all-linear does not see it
    linear_only: bool = False  # quantizes nn.Linear layers only (a Conv1D model is refused)
    dora: str | None = None  # why peft cannot train DoRA on it (None: it can)
    merge_bits: tuple[int, ...] | None = None  # bits merge --onto dequantized dequantizes exactly (None: all)
    dequantize: Callable[[object, object], object] | None = None  # (model, dtype) → the model in plain layers
    sizing: Sizing | None = None  # None: estimate does not model its weights (pre-quantized checkpoints)


def backend_of(recipe: Recipe) -> Backend:
    """The recipe's backend entry."""
    return BACKENDS[recipe.quantization.backend]


def offered_bits(backend: Backend) -> tuple[int, ...]:
    """The bit widths it quantizes to (bits: null, where allowed, is no quantization)."""
    return tuple(b for b in backend.bits if b is not None)


# --------------------------------------------------------------------------- bitsandbytes (default)

BLOCK_4BIT = 64  # bitsandbytes' 4-bit blocksize (transformers' default)
BLOCK_DQ = 256  # blocksize of the second quantization of the absmax constants


def quant_storage(recipe: Recipe, launch=None):
    """The dtype packed 4-bit weights are stored in. FSDP and ZeRO-3 shard only float tensors of one dtype, so
    under them it is the param dtype (model.dtype) unless the recipe names one; elsewhere bitsandbytes' uint8."""
    q = recipe.quantization
    if q.quant_storage:
        return resolve_dtype(q.quant_storage)
    if launch is not None and launch.sharded:
        return resolve_dtype(recipe.model.dtype)
    return None


def bnb_config(bits: int, quant_type: str = "nf4", double_quant: bool = False, compute_dtype=None, storage=None):
    """The one `BitsAndBytesConfig` builder (training's base, merge's reference, `qtune quantize`): load_in_8bit,
    or load_in_4bit with its options (storage None: bitsandbytes' uint8)."""
    from transformers import BitsAndBytesConfig

    from qtune.errors import QtuneError

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits != 4:
        raise QtuneError(f"--bits: {bits} is not supported", "4 or 8")
    kwargs = {"bnb_4bit_quant_storage": storage} if storage is not None else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        **kwargs,
    )


def _bnb_recipe_config(recipe: Recipe, launch=None):
    q = recipe.quantization
    if q.bits is None:
        return None
    storage = quant_storage(recipe, launch)
    return bnb_config(q.bits, q.quant_type, q.double_quant, resolve_dtype(q.compute_dtype), storage)


def _bnb_describe(q: QuantizationSection) -> str:
    if q.bits == 8:
        return "8-bit (LLM.int8)"
    return f"4-bit {q.quant_type.upper()}" + (" + double quant" if q.double_quant else "")


def _bnb_dequantize(model, dtype):
    return model.dequantize(dtype=dtype).to(dtype)  # transformers: bnb.dequantize_4bit per layer


def _bnb_bytes(i: int, o: int, s: Storage) -> int:
    n = i * o
    if s.bits == 8:
        return n + o * 4  # int8 values + fp32 row scales (SCB)
    blocks = math.ceil(n / BLOCK_4BIT)
    total = math.ceil(n / 2) + 16 * 4  # packed values + the 16-entry fp32 NF4/FP4 code
    if s.double_quant:
        return (
            total + blocks + math.ceil(blocks / BLOCK_DQ) * 4 + 256 * 4 + 4
        )  # uint8 absmax, fp32 scales, code, offset
    return total + blocks * 4


def _bnb_how(n: int, s: Storage) -> str:
    if s.bits == 8:
        return f"{n:,} x 1 B + fp32 scale per output row"
    consts = "uint8 absmax per 64 + fp32 per 256 absmax" if s.double_quant else "fp32 absmax per 64"
    return f"{n:,} x 0.5 B + {consts}"


BNB_SIZING = Sizing(
    layer_bytes=_bnb_bytes,
    name=lambda s: (
        ("4-bit NF4" + (" + double quant" if s.double_quant else "") if s.bits == 4 else "8-bit LLM.int8")
        + " (bitsandbytes)"
    ),
    how=_bnb_how,
)


# --------------------------------------------------------------------------- optimum-quanto


def _quanto_config(recipe: Recipe, launch=None):
    from transformers import QuantoConfig

    return QuantoConfig(weights={8: "int8", 4: "int4"}[recipe.quantization.bits])


def quanto_group(in_features: int) -> int:
    """optimum-quanto's int4 group along the input (QModuleMixin): 128, else 96, 64 or 32 when that divides the
    input; the whole row when the input is ≤ 128 or none divides."""
    if in_features > 128:
        for group in (128, 96, 64, 32):
            if in_features % group == 0:
                return group
    return in_features


def _quanto_bytes(i: int, o: int, s: Storage) -> int:
    n = i * o
    total = 2 * 4  # the QLinear's fp32 input_scale and output_scale
    if s.bits == 8:
        return total + n + o * s.load_bytes  # int8 values + a scale per output row
    group = quanto_group(i)
    groups = n // group  # packed two per byte along the groups (an odd count pads one group)
    return total + math.ceil(groups / 2) * group + 2 * groups * s.load_bytes  # + scale and shift per group


def _quanto_how(n: int, s: Storage) -> str:
    if s.bits == 8:
        return f"{n:,} x 1 B + a {s.load_bytes} B scale per output row + 2 fp32 scalars per layer"
    return (
        f"{n:,} x 0.5 B + a {s.load_bytes} B scale and shift per group of 128 inputs (fewer where 128 "
        "does not divide the input) + 2 fp32 scalars per layer"
    )


# --------------------------------------------------------------------------- torchao


def _torchao_config(recipe: Recipe, launch=None):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    # int8 weight-only: the layout peft's TorchaoLoraLinear supports (its int4 path is refused by peft, and
    # torchao 0.18's Int4WeightOnlyConfig needs the mslk package on this CPU).
    return TorchAoConfig(Int8WeightOnlyConfig())


# --------------------------------------------------------------------------- hqq

HQQ_GROUP_SIZE = 64  # hqq's and transformers' HqqConfig default


def hqq_quantizes_on_load() -> bool:
    """transformers can load with `HqqConfig` (4.x could; 5.24's HqqHfQuantizer raises 'QuantizationMethod.HQQ
    is not available yet'). When it cannot, `quantize_after_load` quantizes with hqq's own helper instead."""
    from transformers.quantizers.quantizer_hqq import HqqHfQuantizer

    return "get_quantize_ops" in vars(HqqHfQuantizer)


def _hqq_config(recipe: Recipe, launch=None):
    if not hqq_quantizes_on_load():
        return None  # loaded unquantized: quantize_after_load quantizes it
    from transformers import HqqConfig

    return HqqConfig(nbits=recipe.quantization.bits, group_size=HQQ_GROUP_SIZE)


def _hqq_after_load(recipe: Recipe, model):
    """The way hqq documents it: quantize the model loaded unquantized with hqq's Hugging Face helper (every linear
    but lm_head becomes an HQQLinear; the other layers are cast to the compute dtype)."""
    if hqq_quantizes_on_load():
        return model
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    q = recipe.quantization
    config = BaseQuantizeConfig(nbits=q.bits, group_size=HQQ_GROUP_SIZE)
    compute = resolve_dtype(q.compute_dtype)
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=compute, device=str(model.device))
    return model


def _hqq_layer() -> type:
    from hqq.core.quantize import HQQLinear

    return HQQLinear


def _hqq_bytes(i: int, o: int, s: Storage) -> int:
    n = i * o
    groups = n // (s.group_size or HQQ_GROUP_SIZE)
    return n * s.bits // 8 + 2 * groups * s.load_bytes  # packed values + scale and zero per group


# --------------------------------------------------------------------------- gptq (a pre-quantized checkpoint)

# GPT-QModel's kernel for a GPTQ base: its pure-torch QuantLinear (TorchLinear) trains (SUPPORTS_TRAINING) on the CPU
# and on CUDA, and naming it skips the kernel auto-selection, which on an AVX512-BF16 CPU JIT-compiles a C++
# inference kernel (TorchCpuAvx512Linear, no training support) for ~2 minutes on first use.
GPTQ_KERNEL = "gptq_torch"


def _gptq_config(recipe: Recipe, launch=None):
    from transformers import GPTQConfig

    # The checkpoint's own quantization_config describes its weights; transformers takes only the loading
    # attributes (the kernel) from this one.
    return GPTQConfig(bits=recipe.quantization.bits, backend=GPTQ_KERNEL)


def _gptq_layer() -> type:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return BaseQuantLinear


# --------------------------------------------------------------------------- merge: dequantizing weight-only layers


def dequantized_weight(module):
    """The weight a weight-only quantized layer multiplies with (its own `dequantize()`), None for other modules."""
    import torch

    from qtune.errors import QtuneError

    if hasattr(module, "W_q") and hasattr(module, "dequantize"):  # hqq's HQQLinear (not an nn.Linear)
        return module.dequantize()
    if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):  # GPT-QModel's QuantLinear (GPTQ)
        weight = module.dequantize_weight()  # [in_features, out_features], what forward multiplies x with
        if weight.shape != (module.in_features, module.out_features):
            raise QtuneError(
                f"{type(module).__name__}.dequantize_weight() gave shape {tuple(weight.shape)}, not "
                f"(in {module.in_features}, out {module.out_features}): this GPT-QModel release is not supported"
            )
        return weight.t()
    weight = getattr(module, "weight", None)
    if not isinstance(module, torch.nn.Linear) or weight is None:
        return None
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    return None if type(data) is torch.Tensor else data.dequantize()


def dequantize_layers(model, dtype):
    """Replace every weight-only quantized linear (optimum-quanto QLinear, torchao Int8Tensor weights, hqq's
    HQQLinear, GPT-QModel's GPTQ QuantLinear) by a plain nn.Linear holding the dequantized weight: the weights
    those layers multiply with, so the adapter merges onto exactly what it was trained against."""
    import torch

    for name, module in list(model.named_modules()):
        weight = dequantized_weight(module)
        if weight is None:
            continue
        dense = torch.nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta", dtype=dtype
        )
        dense.weight = torch.nn.Parameter(weight.to(dtype).clone(), requires_grad=False)
        if module.bias is not None:
            dense.bias = torch.nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model.to(dtype)


# --------------------------------------------------------------------------- the table


def _named(q: QuantizationSection) -> str:
    return f"{q.bits}-bit {q.backend}"


# Order: the order quantization.backend lists them in (the recipe reference, messages that name several).
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in [
        Backend(
            name="bnb",
            library="bitsandbytes",
            doc="bnb (bitsandbytes, default)",
            bits=(4, 8, None),
            describe=_bnb_describe,
            config=_bnb_recipe_config,
            keys=("quant_type", "double_quant", "compute_dtype", "quant_storage"),
            upcast=True,
            merge_bits=(4,),  # LLM.int8 weights do not dequantize exactly
            dequantize=_bnb_dequantize,
            sizing=BNB_SIZING,
        ),
        Backend(
            name="quanto",
            library="optimum-quanto",
            doc="quanto (optimum-quanto int8/int4 weights, extra qtune[quanto])",
            bits=(4, 8),
            describe=_named,
            config=_quanto_config,
            modules=("optimum.quanto",),
            extra="quanto",
            # peft's fp32 upcast of the non-quantized parts cannot skip quanto's weights (they report the load
            # dtype and refuse a cast: "The dtype of a weights Tensor cannot be changed"), so a quanto base keeps
            # the load dtype, as peft itself does for torchao and hqq bases.
            kbit_prepare=False,
            dequantize=dequantize_layers,
            sizing=Sizing(layer_bytes=_quanto_bytes, name=lambda s: f"int{s.bits} weights (quanto)", how=_quanto_how),
        ),
        Backend(
            name="torchao",
            library="torchao",
            doc="torchao (int8 weight-only, extra qtune[torchao])",
            bits=(8,),
            describe=_named,
            config=_torchao_config,
            modules=("torchao",),
            extra="torchao",
            dequantize=dequantize_layers,
            sizing=Sizing(
                layer_bytes=lambda i, o, s: i * o + o * (4 + 1),  # int8 values + fp32 scale, int8 zero per row
                name=lambda s: "int8 weight-only (torchao)",
                how=lambda n, s: f"{n:,} x 1 B + fp32 scale and int8 zero point per output row",
            ),
        ),
        Backend(
            name="hqq",
            library="hqq",
            doc="hqq (4/8-bit HQQ, groups of 64, extra qtune[hqq])",
            bits=(4, 8),
            describe=_named,
            config=_hqq_config,
            modules=("hqq",),
            extra="hqq",
            keys=("compute_dtype",),
            after_load=_hqq_after_load,
            quantized_layer=_hqq_layer,  # HQQLinear is not an nn.Linear
            linear_only=True,
            dequantize=dequantize_layers,
            sizing=Sizing(
                layer_bytes=_hqq_bytes,
                name=lambda s: f"{s.bits}-bit (hqq, groups of {s.group_size or HQQ_GROUP_SIZE})",
                how=lambda n, s: (
                    f"{n:,} x {s.bits / 8:g} B + a {s.load_bytes} B scale and zero per group of "
                    f"{s.group_size or HQQ_GROUP_SIZE}"
                ),
                compute_dtype_casts_all=True,
            ),
        ),
        Backend(
            name="gptq",
            library="GPT-QModel",
            doc="gptq (model.name is a pre-quantized 4/8-bit GPTQ checkpoint, loaded as saved, extra qtune[gptq])",
            bits=(4, 8),
            describe=lambda q: f"{q.bits}-bit gptq (pre-quantized checkpoint, kernel {GPTQ_KERNEL})",
            config=_gptq_config,
            modules=("optimum.gptq", "gptqmodel"),  # transformers loads GPTQ through optimum + GPT-QModel
            extra="gptq",
            checkpoint="gptq",
            quantized_layer=_gptq_layer,  # GPT-QModel's QuantLinear is not an nn.Linear
            dora="peft's LoRA layer for GPTQ weights (GPTQLoraLinear) does not support DoRA",
            dequantize=dequantize_layers,
        ),
        Backend(
            name="awq",
            library="GPT-QModel (AWQ)",
            doc="awq: refused at start with the reason (see the README's backend table)",
            bits=(4,),
            describe=_named,
            # Tried on the CPU (gptqmodel 7.7, transformers 5.24): LoRA trains on a GPT-QModel AWQ checkpoint, but
            # its layers have no dequantize_weight(), the kernels transformers' AwqConfig accepts either compute in
            # fp16 (torch_awq) or repack the weights (torch_fused_awq), so a merge cannot be verified exactly.
            refused=(
                "quantization.backend: awq is not offered: qtune cannot dequantize GPT-QModel's AWQ layers for a "
                "verified merge (training on an AWQ checkpoint is unverified, refused)",
                "use a GPTQ checkpoint with quantization.backend gptq, or bnb (default), quanto, torchao or hqq",
            ),
            checkpoint="awq",
        ),
    ]
}


# --------------------------------------------------------------------------- what the loaders call


def check_backend(recipe: Recipe) -> None:
    """Before any weight loads: the quantization backend is installed and works with these library versions."""
    import importlib.util

    from qtune.errors import QtuneError

    backend = backend_of(recipe)
    if recipe.quantization.bits is None:
        return
    if backend.refused:
        raise QtuneError(*backend.refused)
    for module in backend.modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise QtuneError(
                f"quantization.backend: {backend.name} is not installed (module {module} not found)",
                f"pip install 'qtune[{backend.extra}]'",
            )


def quantization_config(recipe: Recipe, launch=None):
    """transformers' quantization config for the recipe's backend (None: plain LoRA, or a backend that quantizes
    after loading)."""
    backend = backend_of(recipe)
    if recipe.quantization.bits is None:
        return None
    if backend.config is None:
        check_backend(recipe)  # a refused backend: refused there with the reason
        raise AssertionError(backend.name)
    return backend.config(recipe, launch)


@contextlib.contextmanager
def checkpoint_config_notice_silenced():
    """from_pretrained with the kernel-only GPTQConfig warns that the checkpoint's quantization_config is used and
    only the loading attributes (the kernel) are taken from ours: exactly what backend gptq means, so not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        yield


def quantize_after_load(recipe: Recipe, model):
    """hqq where transformers cannot quantize on load (see `_hqq_after_load`). Backends that quantized while
    loading: the model is returned as it is."""
    after_load = backend_of(recipe).after_load
    if recipe.quantization.bits is None or after_load is None:
        return model
    return after_load(recipe, model)


def lora_targets(recipe: Recipe, model):
    """LoRA target_modules for the loaded model. peft resolves all-linear to nn.Linear / Conv1D layers, and
    hqq's HQQLinear and GPT-QModel's QuantLinear are neither: with those, all-linear becomes the names of
    the quantized layers."""
    targets = recipe.lora.target_modules
    layer = backend_of(recipe).quantized_layer
    if layer is None or recipe.quantization.bits is None or targets != "all-linear":
        return targets
    quantized = layer()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, quantized)})


def describe(recipe: Recipe) -> str:
    """One phrase for logs and the model card: how the base is quantized."""
    q = recipe.quantization
    if q.bits is None:
        return "no quantization"
    return backend_of(recipe).describe(q)
