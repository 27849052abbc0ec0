"""`qtune quantize`: the seed tutorial's flow as one command: load a model with a BitsAndBytesConfig, print
get_memory_footprint() before and after (plus the constants it leaves out), save safetensors + tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

from qtune.errors import QtuneError
from qtune.model import check_unquantized_checkpoint, check_weight_files
from qtune.rundir import check_no_pickle_files, check_output_dir, staged_output

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype names


def _size(n: int) -> str:
    """Bytes in the seed tutorial's unit (GiB, which it prints as "GB"), or MiB for small models."""
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.3f} MiB"


def quant_constants_bytes(model) -> int:
    """Bytes of the quantization constants that get_memory_footprint() leaves out: 4-bit absmax (and with
    double quant its 8-bit absmax + fp32 scales + code), 8-bit per-row scales (SCB)."""
    import bitsandbytes as bnb

    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            scb = getattr(module.weight, "SCB", None)
            total += scb.numel() * scb.element_size() if scb is not None else 0
    return total


def _footprint_of_original(model: str, dtype, trust_remote_code: bool) -> tuple[int, str]:
    """get_memory_footprint() of the unquantized model, built on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    if dtype is None:  # what from_pretrained would load: the checkpoint's own dtype
        dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return meta.get_memory_footprint(), str(dtype).replace("torch.", "")


def load_quantized(model: str, bits: int, quant_type="nf4", double_quant=False, dtype=None, allow_pickle=False):
    """`from_pretrained(model, quantization_config=...)` as in the seed, safetensors only unless allowed."""
    from transformers import AutoModelForCausalLM

    from qtune.model import single_process_device_map
    from qtune.quant import bnb_config, resolve_dtype

    check_weight_files(model, allow_pickle)
    config = bnb_config(bits, quant_type, double_quant, compute_dtype=dtype or resolve_dtype("auto"))
    try:
        return AutoModelForCausalLM.from_pretrained(
            model,
            quantization_config=config,
            dtype=dtype or "auto",
            device_map=single_process_device_map(),
            use_safetensors=None if allow_pickle else True,
        )
    except OSError as exc:
        raise QtuneError(
            f"{model}: cannot load: {str(exc).strip().splitlines()[0][:300]}",
            "give a local model folder with safetensors weights (or a cached hub id); --allow-pickle accepts .bin",
        ) from None


def quantize(
    model: str,
    bits: int,
    out: str | os.PathLike | None,
    quant_type: str = "nf4",
    double_quant: bool = False,
    dtype: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    staging: Path | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    log=print,
) -> dict:
    """Load MODEL quantized with bitsandbytes, print footprints before/after, save safetensors + tokenizer.

    With `staging` given, write into that (existing, empty) folder and leave the rename to the caller."""
    import torch
    from transformers import AutoTokenizer

    torch_dtype = getattr(torch, DTYPES[dtype]) if dtype else None
    dest = Path(out) if out is not None else None
    if dest is not None:
        check_output_dir(dest, overwrite)
    check_weight_files(model, allow_pickle)
    check_unquantized_checkpoint(model, "MODEL", f"quantize --bits {bits} (bitsandbytes)", "give as MODEL")
    before, before_dtype = _footprint_of_original(model, torch_dtype, trust_remote_code=False)
    quantized = load_quantized(model, bits, quant_type, double_quant, torch_dtype, allow_pickle)
    after = quantized.get_memory_footprint()
    constants = quant_constants_bytes(quantized)
    label = (
        f"{bits}-bit" + (f" {quant_type.upper()}" if bits == 4 else "") + (" + double quant" if double_quant else "")
    )
    log(f"qtune: {model}: {before_dtype} model: {_size(before)} (get_memory_footprint)")
    log(f"qtune: {label} model: {_size(after)} (get_memory_footprint)")
    log(
        f"qtune: get_memory_footprint leaves out the quantization constants: +{_size(constants)} "
        f"→ {_size(after + constants)} in all"
    )
    report = {
        "model": model,
        "bits": bits,
        "quant_type": quant_type if bits == 4 else None,
        "double_quant": double_quant if bits == 4 else None,
        "footprint_before_bytes": before,
        "footprint_before_dtype": before_dtype,
        "footprint_after_bytes": after,
        "quant_constants_bytes": constants,
    }

    def save(folder: Path) -> None:
        quantized.save_pretrained(folder, safe_serialization=True)
        try:
            AutoTokenizer.from_pretrained(str(tokenizer_from or model)).save_pretrained(folder)
        except (OSError, ValueError):
            log(f"qtune: note: no tokenizer found with {model}; saved the weights only")
        check_no_pickle_files(folder)

    if staging is not None:
        save(staging)
        return report
    with staged_output(dest) as folder:
        save(folder)
    log(f"qtune: saved {dest} (safetensors only): {', '.join(sorted(p.name for p in dest.iterdir()))}")
    return report
