"""After training: merge the adapter into its base (and verify it), quantize-and-save, publish to the Hub.

Everything written here is safetensors / JSON / YAML / text, staged in a temporary folder next to the
destination and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qtune.config import Recipe
from qtune.errors import QtuneError
from qtune.rundir import (
    PICKLE_SUFFIXES,
    RunDir,
    check_no_pickle_files,
    check_output_dir,
    staged_output,
)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Largest logit difference accepted between the merged model and its reference, relative to the largest
# reference logit (at least 1), and the top-1 agreement demanded, per dtype the merged weights are saved in.
TOLERANCE = {"float32": (1e-4, 1.0), "float16": (2e-2, 0.95), "bfloat16": (5e-2, 0.95)}
VERIFY_PROMPTS = (
    "The meaning of life is",
    "Question: what is two plus two?\nAnswer:",
    "def fibonacci(n):",
)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------- checkpoints


def check_no_pickle(model: str, allow_pickle: bool) -> None:
    """A local model folder must hold safetensors weights unless the user accepts pickle's risk."""
    folder = Path(model)
    if allow_pickle or not folder.is_dir():
        return
    names = [p.name for p in folder.iterdir()]
    if not any(n.endswith(".safetensors") for n in names) and any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise QtuneError(
            f"{folder}: weights are pickle files ({', '.join(n for n in names if n.endswith(PICKLE_SUFFIXES))}); "
            "loading a pickle can run arbitrary code",
            "convert them to safetensors, or pass --allow-pickle if you trust where they came from",
        )


def _checkpoint_config(model: str, revision=None, trust_remote_code=False):
    """MODEL's config, None when it cannot be read (loading the model then reports why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def check_unquantized_checkpoint(model: str, key: str, command: str, fix: str, revision=None, trust_remote_code=False):
    """Before loading: MODEL's config.json carries no quantization_config (GPTQ, AWQ, bitsandbytes, …)."""
    from qtune.model import prequantized_method

    config = _checkpoint_config(model, revision, trust_remote_code)
    method = prequantized_method(config) if config is not None else None
    if method:
        raise QtuneError(
            f"{key}: '{model}' is already quantized ({method}); {command} needs unquantized weights "
            "(bf16 / fp16 / fp32)",
            f"{fix} the unquantized checkpoint it was made from",
        )


def check_gptq_checkpoint(model: str, key: str, recipe: Recipe, revision=None) -> None:
    """Before loading: MODEL is a GPTQ checkpoint with the bits the run (quantization.backend gptq) trained on."""
    from qtune.model import prequantized_bits, prequantized_method

    config = _checkpoint_config(model, revision, recipe.model.trust_remote_code)
    if config is None:
        return
    method, bits = prequantized_method(config), prequantized_bits(config)
    if method == "gptq" and bits == recipe.quantization.bits:
        return
    found = (
        f"a {method} checkpoint" + (f" ({bits}-bit)" if bits else "")
        if method
        else "plain weights (no quantization_config)"
    )
    raise QtuneError(
        f"{key}: '{model}' is {found}; the run trained LoRA on a {recipe.quantization.bits}-bit GPTQ checkpoint "
        "(quantization.backend: gptq), which merge --onto dequantized dequantizes",
        "pass --base the GPTQ checkpoint the run trained on, or --onto original --base the unquantized checkpoint "
        "it was made from",
    )


# --------------------------------------------------------------------------- loading


# --------------------------------------------------------------------------- merge


def _peak_gib() -> float:
    """This process's peak memory so far (GPU allocator, else resident set), in GiB."""
    from qtune.monitor import peak_memory_bytes

    peak = peak_memory_bytes()
    return peak.get("allocated", peak.get("rss", 0)) / 2**30


@dataclass(frozen=True)
class Comparison:
    max_diff: float
    mean_diff: float
    top1: float
    scale: float  # largest |logit| of the reference

    def within(self, rel_tol: float, min_top1: float) -> bool:
        return self.max_diff <= rel_tol * max(1.0, self.scale) and self.top1 >= min_top1

    def text(self) -> str:
        return f"max |Δlogit| {self.max_diff:.3g}, mean {self.mean_diff:.3g}, top-1 agreement {100 * self.top1:.1f}%"


def _logits(model, tokenizer, prompts) -> list:
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            out.append(model(**ids).logits[0].float().cpu())
    return out


def compare(logits, reference) -> Comparison:
    import torch

    a, b = torch.cat(logits), torch.cat(reference)
    diff = (a - b).abs()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return Comparison(diff.max().item(), diff.mean().item(), top1, b.abs().max().item())


def merge_tolerance(saved_dtype: str, load_dtype: str) -> tuple[float, float]:
    """TOLERANCE for the coarser of the dtype the merged weights are saved in and the one the run loaded its base in
    (the reference logits are computed in it): an fp32 merge of a bf16 run differs from it by bf16 rounding."""
    from qtune.quant import resolve_dtype

    loaded = str(resolve_dtype(load_dtype)).removeprefix("torch.")
    candidates = [TOLERANCE[saved_dtype], TOLERANCE.get(loaded, TOLERANCE["float32"])]
    return max(c[0] for c in candidates), min(c[1] for c in candidates)


def merge(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    dtype: str = "fp32",
    onto: str = "dequantized",
    base: str | None = None,
    quantize_bits: int | None = None,
    prompts: tuple[str, ...] = (),
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    log=print,
) -> dict:
    """Merge RUN_DIR's adapter into its base, verify the logits, save safetensors + tokenizer, return the report.

    onto=dequantized: the base quantized exactly as in training, then dequantized (the weights the adapter
    was trained against). onto=original: the base's original weights (ignores the quantization error).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.model import attach_adapter, load_trained, single_process_device_map
    from qtune.quant import backend_of

    run = RunDir.open(run_dir)
    recipe = run.recipe
    if onto not in ("dequantized", "original"):
        raise QtuneError(f"--onto: unknown mode '{onto}'", "dequantized (default) or original")
    if dtype not in DTYPES:
        raise QtuneError(f"--dtype: unknown dtype '{dtype}'", "bf16, fp16 or fp32")
    torch_dtype = getattr(torch, DTYPES[dtype])
    dest = Path(out) if out else run.merged
    check_output_dir(dest, overwrite)
    base_name = base or recipe.model.name
    check_no_pickle(base_name, allow_pickle=False)
    base_key = "--base" if base else f"model.name (in {run.recipe_file})"
    backend = backend_of(recipe)
    if backend.checkpoint and onto == "dequantized":
        # The run trained on a GPTQ checkpoint as it was saved: the merge dequantizes that checkpoint.
        check_gptq_checkpoint(base_name, base_key, recipe, revision=None if base else recipe.model.revision)
    else:
        check_unquantized_checkpoint(
            base_name,
            base_key,
            "merge"
            + (f" --quantize {quantize_bits}" if quantize_bits else "")
            + (" --onto original" if onto == "original" else ""),
            "pass --base",
            revision=None if base else recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    quantized_in_training = recipe.quantization.bits is not None
    if quantized_in_training:
        from qtune.quant import check_backend

        check_backend(recipe)  # the run's backend is installed here (else: the extra to install)
    exact = backend.merge_bits
    if onto == "dequantized" and quantized_in_training and exact is not None and recipe.quantization.bits not in exact:
        raise QtuneError(
            f"merge --onto dequantized: the run trained on an {recipe.quantization.bits}-bit base; only "
            f"{' or '.join(map(str, exact))}-bit bases are dequantized exactly",
            "use --onto original",
        )
    tokenizer = AutoTokenizer.from_pretrained(str(run.adapter))
    prompts = tuple(prompts) or VERIFY_PROMPTS
    start_mem = _peak_gib()

    # 1. The reference: the adapter on the base as it was trained (4-bit), on fixed prompts.
    m = recipe.model
    # gptq --onto original: --base is the unquantized checkpoint; training's base is the recipe's GPTQ one.
    gptq_original = backend.checkpoint is not None and onto == "original"
    trained = load_trained(recipe, run.adapter, base=None if gptq_original else base)
    reference = _logits(trained, tokenizer, prompts)

    # 2. The base to merge into, in the requested dtype.
    if onto == "dequantized" and quantized_in_training:
        model = trained.unload()  # the 4-bit base again, LoRA layers removed; reuse it (no second load)
        del trained
        # the backend's entry: transformers' dequantize for bnb, quant.dequantize_layers for the others
        model = backend.dequantize(model, torch_dtype)
    else:
        del trained
        model = AutoModelForCausalLM.from_pretrained(
            base_name,
            revision=None if base else m.revision,
            dtype=torch_dtype,
            trust_remote_code=m.trust_remote_code,
            device_map=single_process_device_map(),
            use_safetensors=True,
        )
    peft_model = attach_adapter(model, run.adapter, base_name)
    unmerged = _logits(peft_model, tokenizer, prompts) if onto == "original" else None
    merged = peft_model.merge_and_unload()
    merged_logits = _logits(merged, tokenizer, prompts)
    peak = _peak_gib()

    # 3. Verify. dequantized: merged must equal the adapter on the 4-bit base (what training optimised).
    #    original: merged must equal the adapter on the original weights; the gap to training is reported.
    rel_tol, min_top1 = merge_tolerance(DTYPES[dtype], m.dtype)
    vs_trained = compare(merged_logits, reference)
    check = vs_trained if onto == "dequantized" or not quantized_in_training else compare(merged_logits, unmerged)
    log(f"qtune: merged ({onto}, {dtype}) vs adapter on the base as trained: {vs_trained.text()}")
    if check is not vs_trained:
        log(f"qtune: merged ({onto}, {dtype}) vs adapter on the original base (unmerged): {check.text()}")
        log(
            "qtune: note: --onto original ignores the quantization error the adapter was trained with; "
            "the first line is how far that moves the logits (--onto dequantized reproduces training)"
        )
    tolerance_text = f"max |Δlogit| ≤ {rel_tol:g} × max(1, max|logit| = {check.scale:.3g}), top-1 ≥ {100 * min_top1:g}%"
    if not check.within(rel_tol, min_top1):
        raise QtuneError(
            f"merge verification failed: {check.text()} exceeds the tolerance ({tolerance_text}); nothing was written",
            "the adapter may not belong to this base; try --dtype fp32; --debug shows details",
        )
    log(f"qtune: verified within tolerance ({tolerance_text})")

    report = {
        "onto": onto,
        "dtype": DTYPES[dtype],
        "base_model": base_name,
        "prompts": list(prompts),
        "vs_trained": vs_trained.__dict__,
        "checked": check.__dict__,
        "tolerance": {"relative_max_diff": rel_tol, "min_top1": min_top1},
        "weights_gib": merged.get_memory_footprint() / 2**30,
        "peak_memory_gib": peak,
        "memory_before_load_gib": start_mem,
        "quantized_on_save": quantize_bits,
    }

    # 4. Save: safetensors shards + tokenizer + generation config, staged then renamed.
    with staged_output(dest) as staging:
        if quantize_bits:  # save the merge beside it, then quantize that into the staging folder
            with tempfile.TemporaryDirectory(prefix=f".{dest.name}.merged-", dir=dest.parent) as plain:
                merged.save_pretrained(plain, safe_serialization=True, max_shard_size=max_shard_size)
                tokenizer.save_pretrained(plain)
                del merged, peft_model, model
                report["quantize"] = quantize(
                    plain, quantize_bits, out=None, staging=staging, log=log, tokenizer_from=Path(plain)
                )
        else:
            merged.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(staging)
            del merged, peft_model, model
        (staging / "qtune_merge.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        check_no_pickle_files(staging)
    log(
        f"qtune: merged model saved to {dest} ({report['weights_gib'] * 1024:.1f} MiB of weights in {DTYPES[dtype]}); "
        f"peak memory {peak:.2f} GiB ({'GPU allocator' if single_process_device_map() else 'process RSS, incl. ~'}"
        + ("" if single_process_device_map() else f"{start_mem:.2f} GiB of libraries before loading")
        + ")"
    )
    return report


# --------------------------------------------------------------------------- quantize (the seed tutorial)


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

    check_no_pickle(model, allow_pickle)
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
    check_no_pickle(model, allow_pickle)
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


# --------------------------------------------------------------------------- push


def check_repo_id(repo_id: str | None, key: str = "--repo-id") -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not repo_id or not REPO_ID.match(repo_id):
        raise QtuneError(f"{key}: '{repo_id}' is not ORG/NAME", "e.g. my-user/llama2-7b-qlora-alpaca")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise QtuneError(f"{key}: '{repo_id}' is not a valid Hub repo id: {str(exc).splitlines()[0]}") from None
    return repo_id


def hub_token() -> str:
    """The token from HF_TOKEN or the stored `hf auth login`; held in memory only, never written or logged."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise QtuneError("no Hugging Face token: set HF_TOKEN or run `hf auth login`", "a token with write access")
    return token


def check_push_after_training(repo_id: str | None, run_dir: str = "RUN_DIR") -> None:
    """`hub.push: true`, before any model loads: the repo id parses, the Hub is not switched off, a token is set."""
    import shlex

    from huggingface_hub import get_token, is_offline_mode

    check_repo_id(repo_id, key="hub.repo_id")
    later = f"set hub.push: false and run `qtune push {shlex.quote(str(run_dir))} --repo-id {repo_id}` after training"
    if is_offline_mode():
        raise QtuneError(
            "hub.push: HF_HUB_OFFLINE=1 is set, so the adapter could not be uploaded after training",
            f"unset HF_HUB_OFFLINE, or {later}",
        )
    if not get_token():
        raise QtuneError(
            "hub.push: no Hugging Face token to upload with after training",
            f"set HF_TOKEN or run `hf auth login` (a token with write access), or {later}",
        )


def push_after_training(run_dir: Path, repo_id: str, private: bool, log=print) -> str:
    """The end of `train` with hub.push: upload the saved adapter; a failed upload leaves it saved and says
    the exact `qtune push` command that retries it."""
    import shlex

    try:
        return push(run_dir, repo_id, private=private, log=log)
    except QtuneError as exc:
        retry = f"qtune push {shlex.quote(str(run_dir))} --repo-id {repo_id}" + ("" if private else " --public")
        raise QtuneError(
            f"training finished and the adapter is saved in {Path(run_dir) / 'adapter'}, but {exc.message}",
            (f"{exc.hint}; " if exc.hint else "") + f"then retry the upload with: {retry}",
        ) from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP client raises when the Hub cannot be reached (connection refused, timeout)."""

    errors: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        with contextlib.suppress(ImportError):
            errors.append(__import__(name).HTTPError)
    return tuple(errors)


def _hub_id(name: str) -> str | None:
    """`name` if it looks like a Hub repo id rather than a local path."""
    if Path(name).exists() or not REPO_ID.match(name):
        return None
    return name


def model_card(recipe: Recipe, repo_id: str, merged: bool, summary: dict | None, license: str = "other") -> str:
    """README.md with YAML metadata (base_model, library_name, tags, datasets, license) and a usage snippet."""
    import yaml
    from huggingface_hub import ModelCardData

    from qtune.config import recipe_to_dict
    from qtune.quant import describe as describe_quantization

    base = recipe.model.name
    base_id = _hub_id(base)
    datasets = [d for d in (_hub_id(s.path) for s in recipe.data.datasets) if d]
    data = ModelCardData(
        base_model=base_id,
        library_name="transformers" if merged else "peft",
        tags=["qtune", "qlora", "lora", "sft", "trl", "peft"] + (["merged"] if merged else []),
        license=license,
        datasets=datasets or None,
        pipeline_tag="text-generation",
    )
    quant = describe_quantization(recipe)
    figures = []
    for key, label in [
        ("steps", "steps"),
        ("train_loss", "train loss"),
        ("eval_loss", "eval loss"),
        ("wall_time_s", "wall time (s)"),
        ("world_size", "processes"),
    ]:
        if summary and summary.get(key) is not None:
            value = summary[key]
            figures.append(f"| {label} | {value:.4g} |" if isinstance(value, float) else f"| {label} | {value} |")
    if merged:
        usage = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")'
        )
    else:
        usage = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  # loads the base, then the adapter\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")'
        )
    kind = "merged model (LoRA adapter folded into the base weights)" if merged else "LoRA adapter"
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{base}` (a local model)"
    sources = ", ".join(f"`{s.path}`" for s in recipe.data.datasets)
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {kind} fine-tuned with [qtune](https://github.com/) (QLoRA: {quant} base, LoRA r={recipe.lora.r}, "
        f"alpha={recipe.lora.alpha:g}) from {base_text} on {sources}.",
        "",
        "## Training figures",
        "",
        *(["| figure | value |", "|---|---|", *figures] if figures else ["No summary.json was found for this run."]),
        "",
        "## Usage",
        "",
        "```python",
        usage,
        "```",
        "",
        "## Recipe",
        "",
        "The resolved recipe this was trained with (`qtune train recipe.yaml` repeats the run):",
        "",
        "```yaml",
        yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def stage_push(run_dir: str | os.PathLike, repo_id: str, merged: bool, into: Path, license: str = "other") -> Path:
    """Copy the files to upload (adapter or merged model, tokenizer, README.md) into the empty folder `into`."""
    run = RunDir.open(run_dir)
    source = run.require_merged() if merged else run.adapter
    summary = run.summary()
    for item in source.iterdir():
        if item.name.endswith(PICKLE_SUFFIXES) or item.name == "README.md":
            continue  # peft's placeholder card is replaced by ours
        if item.is_file():
            shutil.copy2(item, into / item.name)
    shutil.copy2(run.recipe_file, into / "qtune_recipe.yaml")  # secrets were redacted when it was written
    (into / "README.md").write_text(model_card(run.recipe, repo_id, merged, summary, license), encoding="utf-8")
    check_no_pickle_files(into)
    return into


def upload(folder: Path, repo_id: str, private: bool, token: str, message: str) -> str:
    """HfApi.create_repo + upload_folder; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError, *_network_errors()) as exc:
        text = (str(exc).replace(token, "<token>").strip() or type(exc).__name__).splitlines()[0][:300]
        raise QtuneError(
            f"push to {repo_id} failed: {text}", "check the token's write access and the network"
        ) from None
    return str(getattr(info, "commit_url", info))


def push(
    run_dir: str | os.PathLike,
    repo_id: str,
    merged: bool = False,
    private: bool = True,
    dry_run: str | os.PathLike | None = None,
    license: str = "other",
    log=print,
) -> Path | str:
    """Upload the adapter (or merged model) with tokenizer and model card; with dry_run, stage only."""
    check_repo_id(repo_id)
    if dry_run is not None:
        dest = Path(dry_run)
        check_output_dir(dest)
        with staged_output(dest) as folder:
            stage_push(run_dir, repo_id, merged, folder, license)
        log(
            f"qtune: dry run: files for {repo_id} staged in {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}"
        )
        return dest
    token = hub_token()
    with tempfile.TemporaryDirectory(prefix="qtune-push-") as tmp:
        stage_push(run_dir, repo_id, merged, Path(tmp), license)
        url = upload(Path(tmp), repo_id, private, token, f"qtune: {'merged model' if merged else 'LoRA adapter'}")
    log(f"qtune: pushed {'merged model' if merged else 'adapter'} to https://huggingface.co/{repo_id} ({url})")
    return url
