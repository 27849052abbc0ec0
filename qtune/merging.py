"""`qtune merge`: fold a run's adapter into its base, check the logits against the adapter on the base as it was
trained, and save safetensors (staged beside the destination, renamed into place only when verified)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from qtune.errors import QtuneError
from qtune.logits import VERIFY_PROMPTS, compare_logits, prompt_logits
from qtune.model import base_fingerprint, check_prequantized_base, check_unquantized_checkpoint, check_weight_files
from qtune.quantize import DTYPES, quantize
from qtune.rundir import RunDir, check_no_pickle_files, check_output_dir, staged_output
from qtune.stops import saved_stops, with_stops

# Largest logit difference accepted between the merged model and its reference, relative to the largest
# reference logit (at least 1), and the top-1 agreement demanded, per dtype the merged weights are saved in.
TOLERANCE = {"float32": (1e-4, 1.0), "float16": (2e-2, 0.95), "bfloat16": (5e-2, 0.95)}


def _peak_gib() -> float:
    """This process's peak memory so far (GPU allocator, else resident set), in GiB."""
    from qtune.monitor import peak_memory_bytes

    peak = peak_memory_bytes()
    return peak.get("allocated", peak.get("rss", 0)) / 2**30


def check_base_unchanged(run: RunDir, base: str, key: str) -> None:
    """The base folder holds the weights the run trained on (summary.json's base_fingerprint), when both are known."""
    recorded = (run.summary() or {}).get("base_fingerprint")
    now = base_fingerprint(base)
    if recorded and now and recorded != now:
        raise QtuneError(
            f"{key}: the weights in '{base}' differ from those the run trained on (fingerprint {now}, the run's "
            f"{recorded} in {run.summary_file}); the adapter would be merged onto another model",
            "pass --base the folder holding the base the run was trained on",
        )


def merge_tolerance(saved_dtype: str, load_dtype: str) -> tuple[float, float]:
    """TOLERANCE for the coarser of the dtype the merged weights are saved in and the one the run loaded its base in
    (the reference logits are computed in it): an fp32 merge of a bf16 run differs from it by bf16 rounding."""
    from qtune.quant import resolve_dtype

    loaded = str(resolve_dtype(load_dtype)).removeprefix("torch.")
    candidates = [TOLERANCE[saved_dtype], TOLERANCE.get(loaded, TOLERANCE["float32"])]
    return max(c[0] for c in candidates), min(c[1] for c in candidates)


def merge(run_dir: str | os.PathLike, **options) -> dict:
    """Merge RUN_DIR's adapter into its base, verify the logits, save safetensors + tokenizer, return the report
    (options: those of `merge_locked`). The run dir is held (its lock) for the whole merge."""
    run = RunDir.open(run_dir)
    with run.lock("merge"):
        return merge_locked(run, **options)


def merge_locked(
    run: RunDir,
    out: str | os.PathLike | None = None,
    dtype: str = "fp32",
    onto: str = "dequantized",
    base: str | None = None,
    quantize_bits: int | None = None,
    prompts: tuple[str, ...] = (),
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    log=print,
) -> dict:
    """Merge the run's adapter into its base, verify the logits, save safetensors + tokenizer, return the report.

    onto=dequantized: the base quantized exactly as in training, then dequantized (the weights the adapter
    was trained against). onto=original: the base's original weights (ignores the quantization error).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.model import attach_adapter, load_trained, refuse_reward_run, single_process_device_map
    from qtune.quant import backend_of

    recipe = run.recipe
    refuse_reward_run(recipe, run.path, "merge")
    if onto not in ("dequantized", "original"):
        raise QtuneError(f"--onto: unknown mode '{onto}'", "dequantized (default) or original")
    if dtype not in DTYPES:
        raise QtuneError(f"--dtype: unknown dtype '{dtype}'", "bf16, fp16 or fp32")
    torch_dtype = getattr(torch, DTYPES[dtype])
    dest = Path(out) if out else run.merged
    check_output_dir(dest, overwrite)
    base_name = base or recipe.model.name
    check_weight_files(base_name, allow_pickle)
    base_key = "--base" if base else f"model.name (in {run.recipe_file})"
    backend = backend_of(recipe)
    if backend.checkpoint and onto == "dequantized":
        # The run trained on a GPTQ checkpoint as it was saved: the merge dequantizes that checkpoint.
        check_prequantized_base(base_name, base_key, recipe, revision=None if base else recipe.model.revision)
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
    trained_base = None if gptq_original else base
    if trained_base is None:  # the recipe's own base: still the weights it trained on? (--base says where it is now)
        check_base_unchanged(run, m.name, base_key)
    trained = load_trained(recipe, run.adapter, base=trained_base, allow_pickle=allow_pickle)
    reference = prompt_logits(trained, tokenizer, prompts)

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
            use_safetensors=None if allow_pickle else True,
        )
    peft_model = attach_adapter(model, run.adapter, base_name)
    unmerged = prompt_logits(peft_model, tokenizer, prompts) if onto == "original" else None
    merged = peft_model.merge_and_unload()
    # The run's stop tokens (the adapter's generation_config.json): the merged model stops where the run taught it.
    merged.generation_config = with_stops(merged.generation_config, saved_stops(run.adapter, tokenizer), tokenizer)
    merged_logits = prompt_logits(merged, tokenizer, prompts)
    peak = _peak_gib()

    # 3. Verify. dequantized: merged must equal the adapter on the 4-bit base (what training optimised).
    #    original: merged must equal the adapter on the original weights; the gap to training is reported.
    rel_tol, min_top1 = merge_tolerance(DTYPES[dtype], m.dtype)
    vs_trained = compare_logits(merged_logits, reference)
    check = (
        vs_trained if onto == "dequantized" or not quantized_in_training else compare_logits(merged_logits, unmerged)
    )
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
        "stop_tokens": merged.generation_config.eos_token_id,
    }

    # 4. Save: safetensors shards + tokenizer + generation config, staged then renamed.
    if dest.resolve() == run.merged.resolve():
        run.record_written(run.merged.name)  # a derived output: an --overwrite of the run sets it aside too
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
