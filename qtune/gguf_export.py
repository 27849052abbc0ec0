"""Export a merged model (or a run, merged first) to one GGUF file for llama.cpp and its relatives.

Written with the `gguf` package's own writer and tensor-name map; verified by loading the file back with
transformers' GGUF support and comparing logits with the merged model. The file is written beside `--out`
under a temporary name and renamed into place only after the check passes: a failed export leaves nothing.

Named `gguf_export`, not `gguf`, so that `import gguf` still finds the library.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from qtune.errors import QtuneError

# transformers model_type → the GGUF architecture llama.cpp (and transformers' GGUF loader) knows it by.
# Mistral is written as "llama", as llama.cpp writes it (Mistral is Llama plus an optional sliding window,
# refused below). transformers' loader reads it back as a LlamaForCausalLM: its "mistral" path (general.name
# exactly "mistral") asks gguf 0.19 for a "mistral" tensor map that the package does not have.
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
TYPES = ("f16", "q8_0")
# max |Δlogit| ≤ rel × max(1, max|logit|) and top-1 agreement ≥ min_top1, GGUF model vs the merged model.
TOLERANCE = {"f16": (1e-2, 1.0), "q8_0": (5e-2, 0.9)}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _supported_text() -> str:
    return ", ".join(sorted(ARCHES))


def check_architecture(config: dict, source: str) -> str:
    model_type = config.get("model_type")
    if model_type not in ARCHES:
        raise QtuneError(
            f"{source}: GGUF export does not support the architecture '{model_type}'",
            f"supported: {_supported_text()} (the Llama, Mistral and Qwen2 families)",
        )
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if model_type == "mistral" and window is not None and window < config.get("max_position_embeddings", 0):
        raise QtuneError(
            f"{source}: a sliding attention window ({window} < context {config.get('max_position_embeddings')}) "
            "is not exported to GGUF by qtune",
            "only Mistral models whose window covers the whole context (or none) are supported",
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise QtuneError(
            f"{source}: RoPE scaling '{rope_type}' is not exported to GGUF by qtune",
            "only models with plain RoPE (rope_type default) are supported",
        )
    return model_type


def _read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise QtuneError(f"{out}: is a directory", "--out names the .gguf file to write")
    if out.exists() and not overwrite:
        raise QtuneError(f"{out}: already exists", "choose another --out, or pass --overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    probe = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise QtuneError(f"{out}: cannot write to {probe}", "choose a writable --out")


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise QtuneError(
            "GGUF export needs the `gguf` package", "pip install 'qtune[gguf]' (or: pip install gguf)"
        ) from None
    return gguf


# --------------------------------------------------------------------------- tensors


def permute_rotary(weight, n_heads: int):
    """Q/K rows from Hugging Face's rotary layout (each head: all first halves, then all second halves, as
    `rotate_half` pairs them) to GGML's (each head: the two members of a rotary pair side by side).

    Row r of half h of head n moves to row 2r + h of head n: a reshape to (heads, 2, d/2, …), a swap of the
    two middle axes, a reshape back. transformers' GGUF loader undoes exactly this for llama/mistral."""
    shape = weight.shape
    return weight.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tensors(model, model_type: str, qtype: str, gguf):
    """(gguf name, numpy data, raw GGML type or None) for every weight of `model`, in state-dict order."""
    import numpy as np

    cfg = model.config
    arch = gguf.MODEL_ARCH[ARCHES[model_type].upper()]
    name_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    state = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = []
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # a GGUF without output.weight is read back as tied
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise QtuneError(
                f"GGUF export: no GGUF name for the tensor '{hf_name}' ({model_type})",
                "the model has parts the GGUF format does not describe for this architecture",
            )
        data = tensor.detach().float().cpu().numpy()
        if ARCHES[model_type] == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            data = permute_rotary(data, heads)
        if data.ndim == 1:  # norms and biases stay float32, as llama.cpp expects
            out.append((name, data.astype(np.float32), None))
        elif qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q = gguf.GGMLQuantizationType.Q8_0
            out.append((name, gguf.quants.quantize(data, q), q))
        else:
            out.append((name, data.astype(np.float16), None))
    return out


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_metadata(tokenizer, n_vocab: int, model_type: str) -> dict:
    """The tokenizer as llama.cpp's tokenizer.ggml.* keys: byte-level BPE only (Qwen2, Llama 3 and others)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}

    def kinds(part) -> list[str]:
        if not part:
            return []
        return [part.get("type")] + [k for p in part.get("pretokenizers", part.get("decoders", [])) for k in kinds(p)]

    byte_level = "ByteLevel" in kinds(spec.get("pre_tokenizer")) or "ByteLevel" in kinds(spec.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        kind = model.get("type") if model.get("type") != "BPE" else "BPE without byte-level pre-tokenization"
        raise QtuneError(
            f"GGUF export: the tokenizer is {kind}; qtune writes byte-level BPE tokenizers only",
            "byte-level BPE is what Qwen2 and Llama 3 use; other tokenizers are not exported (nothing was written)",
        )
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    if max(vocab.values()) >= n_vocab:
        raise QtuneError(
            f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} embeddings",
            "the tokenizer does not belong to this model",
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = (CONTROL if added[token].get("special") else USER_DEFINED) if token in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # The split regex, named as llama.cpp names it, when it is one transformers' loader knows; else "default".
    pre = "default"
    split = _split_regex(spec.get("pre_tokenizer"))
    if split is not None:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        pre = next((k for k, v in GGUF_PRE_TOKENIZER_SPLITS.items() if v == split), "default")
    probe = tokenizer("hello")["input_ids"]
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "pre": pre,
        "special": special,
        "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def _split_regex(part) -> str | None:
    if not part:
        return None
    if part.get("type") == "Split":
        pattern = part.get("pattern") or {}
        return pattern.get("Regex")
    for p in part.get("pretokenizers", []):
        found = _split_regex(p)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------- writing


def write_gguf(model, tokenizer, path: Path, qtype: str, name: str) -> None:
    """One GGUF file at `path`: architecture metadata, tokenizer, tensors (f16 or q8_0)."""
    gguf = _import_gguf()
    cfg = model.config
    model_type = cfg.model_type
    arch = ARCHES[model_type]
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tok = _tokenizer_metadata(tokenizer, n_vocab, model_type)
    tensors = _tensors(model, model_type, qtype, gguf)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name if name.lower() != "mistral" else f"{name}-model")  # see ARCHES
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key, token_id in tok["special"].items():
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])
    for tensor_name, data, raw in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------- verification


def verify(path: Path, merged, tokenizer, qtype: str, prompts) -> dict:
    """Load `path` back with transformers' GGUF support; compare tokenizer ids and logits with `merged`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.export import compare

    folder, file = str(path.parent), path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    mismatched = [p for p in prompts if gguf_tokenizer(p)["input_ids"] != tokenizer(p)["input_ids"]]
    if mismatched:
        raise QtuneError(
            f"GGUF verification failed: the file's tokenizer encodes {mismatched[0]!r} differently "
            f"({gguf_tokenizer(mismatched[0])['input_ids']} vs {tokenizer(mismatched[0])['input_ids']}); nothing was written",
            "the tokenizer's pre-tokenization is not one GGUF describes",
        )
    ours, theirs = [], []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt")["input_ids"]
            ours.append(merged(input_ids=ids).logits[0].float())
            theirs.append(loaded(input_ids=ids).logits[0].float())
    result = compare(theirs, ours)
    rel, min_top1 = TOLERANCE[qtype]
    tolerance = f"max |Δlogit| ≤ {rel:g} × max(1, max|logit| = {result.scale:.3g}), top-1 ≥ {100 * min_top1:g}%"
    if not result.within(rel, min_top1):
        raise QtuneError(
            f"GGUF verification failed ({qtype}): {result.text()} exceeds the tolerance ({tolerance}); nothing was written",
            "--debug shows details",
        )
    return {"type": qtype, "comparison": result.__dict__, "tolerance": tolerance, "text": result.text()}


# --------------------------------------------------------------------------- the command


def export_gguf(
    source: str | os.PathLike,
    out: str | os.PathLike,
    qtype: str = "f16",
    overwrite: bool = False,
    prompts: tuple[str, ...] = (),
    log=print,
) -> dict:
    """RUN_DIR (merged first, onto the dequantized base) or MERGED_DIR → one verified GGUF file at `out`."""
    from qtune.export import VERIFY_PROMPTS

    src, dest = Path(source), Path(out)
    if qtype not in TYPES:
        raise QtuneError(f"--type: unknown GGUF type '{qtype}'", f"one of {', '.join(TYPES)}")
    check_out(dest, overwrite)
    prompts = tuple(prompts) or VERIFY_PROMPTS
    if (src / "recipe.yaml").is_file():
        from qtune.export import open_run

        run = open_run(src)  # no adapter → error before anything loads
        base = run.recipe.model.name
        if Path(base).is_dir():
            check_architecture(_read_config(Path(base)), base)
        else:
            from transformers import AutoConfig

            check_architecture(AutoConfig.from_pretrained(base, revision=run.recipe.model.revision).to_dict(), base)
        _import_gguf()
        with tempfile.TemporaryDirectory(
            prefix=".qtune-gguf-merge-", dir=dest.parent if dest.parent.exists() else None
        ) as tmp:
            from qtune import export

            log(f"qtune: {src} is a run directory: merging its adapter onto the dequantized base first")
            export.merge(src, out=Path(tmp) / "merged", dtype="fp32", onto="dequantized", log=log)
            return _export_folder(Path(tmp) / "merged", dest, qtype, prompts, name=src.name, log=log)
    if not (src / "config.json").is_file():
        raise QtuneError(
            f"{src}: neither a run directory (recipe.yaml) nor a model folder (config.json)",
            "give the output_dir of `qtune train`, or a merged model folder (`qtune merge --out`)",
        )
    check_architecture(_read_config(src), str(src))
    _import_gguf()
    return _export_folder(src, dest, qtype, prompts, name=src.name, log=log)


def _export_folder(folder: Path, dest: Path, qtype: str, prompts, name: str, log) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.export import check_no_pickle

    check_no_pickle(str(folder), allow_pickle=False)
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", suffix=".gguf", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_gguf(merged, tokenizer, tmp, qtype, name)
        report = verify(tmp, merged, tokenizer, qtype, prompts)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = dest.stat().st_size
    report.update({"out": str(dest), "bytes": size})
    log(f"qtune: GGUF ({qtype}) loaded back with transformers vs the merged model: {report['text']}")
    log(f"qtune: verified within tolerance ({report['tolerance']})")
    log(f"qtune: wrote {dest} ({size / 2**20:.2f} MiB)")
    return report
