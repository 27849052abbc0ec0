"""Recipe → the quantization backend's config (bitsandbytes by default), and hqq's quantization after loading.
With backend gptq the base is a GPTQ checkpoint, loaded as it was saved (qtune does not quantize it).

Backend knowledge lives here; `model.py` and `export.py` load with it."""

from __future__ import annotations

import contextlib
import warnings

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

# backend → (modules that must import, pip extra). Imported only inside functions: qtune --help stays fast.
BACKEND_EXTRAS = {
    "hqq": (("hqq",), "hqq"),
    "quanto": (("optimum.quanto",), "quanto"),
    "torchao": (("torchao",), "torchao"),
    "gptq": (("optimum.gptq", "gptqmodel"), "gptq"),  # transformers loads GPTQ through optimum + GPT-QModel
}
HQQ_GROUP_SIZE = 64  # hqq's and transformers' HqqConfig default
# GPT-QModel's kernel for a GPTQ base: its pure-torch QuantLinear (TorchLinear) trains (SUPPORTS_TRAINING) on the CPU
# and on CUDA, and naming it skips the kernel auto-selection, which on an AVX512-BF16 CPU JIT-compiles a C++
# inference kernel (TorchCpuAvx512Linear, no training support) for ~2 minutes on first use.
GPTQ_KERNEL = "gptq_torch"


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
    if q.backend == "awq":
        # Tried on the CPU (gptqmodel 7.7, transformers 5.24): LoRA trains on a GPT-QModel AWQ checkpoint, but its
        # layers have no dequantize_weight(), the kernels transformers' AwqConfig accepts either compute in fp16
        # (torch_awq) or repack the weights (torch_fused_awq), so a merge cannot be verified exactly.
        raise QtuneError(
            "quantization.backend: awq is not offered: qtune cannot dequantize GPT-QModel's AWQ layers for a "
            "verified merge (training on an AWQ checkpoint is unverified, refused)",
            "use a GPTQ checkpoint with quantization.backend gptq, or bnb (default), quanto, torchao or hqq",
        )
    modules, extra = BACKEND_EXTRAS[q.backend]
    for module in modules:
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
    if q.backend == "gptq":
        from transformers import GPTQConfig

        # The checkpoint's own quantization_config describes its weights; transformers takes only the loading
        # attributes (the kernel) from this one.
        return GPTQConfig(bits=q.bits, backend=GPTQ_KERNEL)
    check_backend(recipe)  # awq: refused there with the reason
    raise AssertionError(q.backend)


@contextlib.contextmanager
def checkpoint_config_notice_silenced():
    """from_pretrained with the kernel-only GPTQConfig warns that the checkpoint's quantization_config is used and
    only the loading attributes (the kernel) are taken from ours: exactly what backend gptq means, so not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        yield


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
    hqq's HQQLinear and GPT-QModel's QuantLinear are neither: with hqq or gptq, all-linear becomes the names of
    the quantized layers."""
    targets = recipe.lora.target_modules
    backend = recipe.quantization.backend
    if backend not in ("hqq", "gptq") or recipe.quantization.bits is None or targets != "all-linear":
        return targets
    if backend == "hqq":
        from hqq.core.quantize import HQQLinear as quantized
    else:
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear as quantized

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, quantized)})


def describe(recipe: Recipe) -> str:
    """One phrase for logs: how the base is quantized."""
    q = recipe.quantization
    if q.bits is None:
        return "no quantization"
    if q.backend == "gptq":
        return f"{q.bits}-bit gptq (pre-quantized checkpoint, kernel {GPTQ_KERNEL})"
    if q.backend != "bnb":
        return f"{q.bits}-bit {q.backend}"
    if q.bits == 8:
        return "8-bit (LLM.int8)"
    return f"4-bit {q.quant_type.upper()}" + (" + double quant" if q.double_quant else "")
