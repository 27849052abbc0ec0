"""Recipe → `BitsAndBytesConfig`. Builds the config only; `model.py` loads with it."""

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
            "use quantization.backend bnb (default), quanto or torchao",
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
    if q.backend == "hqq":
        from transformers.quantizers.quantizer_hqq import HqqHfQuantizer

        if "get_quantize_ops" not in vars(HqqHfQuantizer):  # transformers 5.x: loading raises NotImplementedError
            import transformers

            raise QtuneError(
                f"quantization.backend: hqq cannot quantize on load with transformers {transformers.__version__} "
                "(it raises 'QuantizationMethod.HQQ is not available yet and will be supported soon.')",
                "use backend quanto or torchao (or bnb); hqq needs a transformers release with HQQ loading",
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
    check_backend(recipe)  # hqq / gptq / awq: refused there with the reason
    raise AssertionError(q.backend)


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
