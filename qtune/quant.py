"""Recipe → the quantization backend's config (bitsandbytes by default), and hqq's quantization after loading.

Backend knowledge lives here; `model.py` and `export.py` load with it."""

from __future__ import annotations

from qtune.config import Recipe


def resolve_dtype(name: str):
    """'auto' → bfloat16 on a GPU that supports it, else float32; other names map to torch dtypes."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def quant_storage(recipe: Recipe, launch=None):
    """The dtype packed 4-bit weights are stored in. FSDP and ZeRO-3 shard only float tensors of one dtype, so
    under them it is the param dtype (model.dtype) unless the recipe names one; elsewhere bitsandbytes' uint8."""
    q = recipe.quantization
    if q.quant_storage:
        return resolve_dtype(q.quant_storage)
    if launch is not None and launch.sharded:
        return resolve_dtype(recipe.model.dtype)
    return None


def bnb_config(recipe: Recipe, launch=None):
    """The `BitsAndBytesConfig` for the recipe (for the launch: `qtune.model.Launch`), or None for plain LoRA."""
    from transformers import BitsAndBytesConfig

    q = recipe.quantization
    if q.bits is None:
        return None
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = resolve_dtype(q.compute_dtype)
    storage = quant_storage(recipe, launch)
    kwargs = {"bnb_4bit_quant_storage": storage} if storage is not None else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        **kwargs,
    )


# --------------------------------------------------------------------------- other backends (issue 9)

# backend → (module that must import, pip extra). Imported only inside functions: qtune --help stays fast.
BACKEND_EXTRAS = {"hqq": ("hqq", "hqq"), "quanto": ("optimum.quanto", "quanto"), "torchao": ("torchao", "torchao")}
HQQ_GROUP_SIZE = 64  # hqq's and transformers' HqqConfig default


def hqq_quantizes_on_load() -> bool:
    """transformers can load with `HqqConfig` (4.x could; 5.24's HqqHfQuantizer raises 'QuantizationMethod.HQQ
    is not available yet'). When it cannot, `quantize_after_load` quantizes with hqq's own helper instead."""
    from transformers.quantizers.quantizer_hqq import HqqHfQuantizer

    return "get_quantize_ops" in vars(HqqHfQuantizer)


def check_backend(recipe: Recipe) -> None:
    """Before any weight loads: the quantization backend is installed and works with these library versions."""
    import importlib.util

    from qtune.errors import QtuneError

    q = recipe.quantization
    if q.backend == "bnb" or q.bits is None:
        return
    if q.backend in ("gptq", "awq"):
        raise QtuneError(
            f"quantization.backend: {q.backend} needs a CUDA GPU and a pre-quantized {q.backend.upper()} "
            "checkpoint; qtune has not verified LoRA training on it (unverified, refused)",
            "use quantization.backend bnb (default), quanto, torchao or hqq",
        )
    module, extra = BACKEND_EXTRAS[q.backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise QtuneError(
            f"quantization.backend: {q.backend} is not installed (module {module} not found)",
            f"pip install 'qtune[{extra}]'",
        )


def quantization_config(recipe: Recipe, launch=None):
    """transformers' quantization config for the recipe's backend (None: plain LoRA)."""
    q = recipe.quantization
    if q.bits is None or q.backend == "bnb":
        return bnb_config(recipe, launch)
    if q.backend == "quanto":
        from transformers import QuantoConfig

        return QuantoConfig(weights={8: "int8", 4: "int4"}[q.bits])
    if q.backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        # int8 weight-only: the layout peft's TorchaoLoraLinear supports (its int4 path is refused by peft, and
        # torchao 0.18's Int4WeightOnlyConfig needs the mslk package on this CPU).
        return TorchAoConfig(Int8WeightOnlyConfig())
    if q.backend == "hqq":
        if not hqq_quantizes_on_load():
            return None  # loaded unquantized: quantize_after_load quantizes it
        from transformers import HqqConfig

        return HqqConfig(nbits=q.bits, group_size=HQQ_GROUP_SIZE)
    check_backend(recipe)  # gptq / awq: refused there with the reason
    raise AssertionError(q.backend)


def quantize_after_load(recipe: Recipe, model):
    """hqq where transformers cannot quantize on load: the way hqq documents it, quantize the model loaded
    unquantized with hqq's Hugging Face helper (every linear but lm_head becomes an HQQLinear; the other layers
    are cast to the compute dtype). Other backends quantized while loading: the model is returned as it is."""
    q = recipe.quantization
    if q.backend != "hqq" or q.bits is None or hqq_quantizes_on_load():
        return model
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    config = BaseQuantizeConfig(nbits=q.bits, group_size=HQQ_GROUP_SIZE)
    compute = resolve_dtype(q.compute_dtype)
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=compute, device=str(model.device))
    return model


def lora_targets(recipe: Recipe, model):
    """LoRA target_modules for the loaded model. peft resolves all-linear to nn.Linear / Conv1D layers, and
    hqq's HQQLinear is neither: with hqq, all-linear becomes the names of its HQQLinear layers."""
    targets = recipe.lora.target_modules
    if recipe.quantization.backend != "hqq" or targets != "all-linear":
        return targets
    from hqq.core.quantize import HQQLinear

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, HQQLinear)})


def describe(recipe: Recipe) -> str:
    """One phrase for logs: how the base is quantized."""
    q = recipe.quantization
    if q.bits is None:
        return "no quantization"
    if q.backend != "bnb":
        return f"{q.bits}-bit {q.backend}"
    if q.bits == 8:
        return "8-bit (LLM.int8)"
    return f"4-bit {q.quant_type.upper()}" + (" + double quant" if q.double_quant else "")
