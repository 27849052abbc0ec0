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
