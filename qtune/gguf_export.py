"""Export a merged model (or a run, merged first) to one GGUF file for llama.cpp and its relatives.

Written with the `gguf` package's own writer and tensor-name map; verified by loading the file back with
transformers' GGUF support and comparing logits with the merged model. The file is written beside `--out`
under a temporary name and renamed into place only after the check passes: a failed export leaves nothing.

Two tokenizer kinds are written, as llama.cpp names them in tokenizer.ggml.model: "gpt2", byte-level BPE
(Qwen2, Llama 3: tokens, merges, the split regex's name) and "llama", sentencepiece-style BPE with byte
fallback (Llama 2, Mistral v0.1: tokens, scores, token types with BYTE for <0x00>..<0xFF>, no merges). A
"llama" file carries scores, not merges: llama.cpp, and transformers' reader when it rebuilds the merges,
join the adjacent pair whose joined piece scores highest, so the scores are derived from the tokenizer.json's
merge order. Other tokenizers (WordPiece, Unigram, WordLevel, …) are refused.

Named `gguf_export`, not `gguf`, so that `import gguf` still finds the library.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from qtune.errors import QtuneError
from qtune.rundir import RunDir, current_umask

# transformers model_type → the GGUF architecture llama.cpp (and transformers' GGUF loader) knows it by.
# Mistral is written as "llama", as llama.cpp writes it (Mistral is Llama plus an optional sliding window,
# refused below). transformers' loader reads it back as a LlamaForCausalLM: its "mistral" path (general.name
# exactly "mistral") asks gguf 0.19 for a "mistral" tensor map that the package does not have.
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
TYPES = ("f16", "q8_0")
# max |Δlogit| ≤ rel × max(1, max|logit|) and top-1 agreement ≥ min_top1, GGUF model vs the merged model.
TOLERANCE = {"f16": (1e-2, 1.0), "q8_0": (5e-2, 0.9)}
# RoPE scalings that only rescale frequencies, written as llama.cpp's rope_freqs tensor (Llama 3.1's "llama3").
ROPE_FREQS_TYPES = ("linear", "llama3")
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _supported_text() -> str:
    return ", ".join(sorted(ARCHES))


def check_gguf_architecture(config: dict, source: str) -> str:
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
    rope_type = _rope_type(config)
    if rope_type in (None, "default"):
        return model_type
    if rope_type not in ROPE_FREQS_TYPES or ARCHES[model_type] != "llama":
        raise QtuneError(
            f"{source}: RoPE scaling '{rope_type}' is not exported to GGUF by qtune ({model_type})",
            f"supported: plain RoPE, and {' / '.join(ROPE_FREQS_TYPES)} scaling on the Llama / Mistral families",
        )
    if not llama_cpp_available():
        raise QtuneError(
            f"{source}: RoPE scaling '{rope_type}' is written as llama.cpp's rope_freqs, which transformers' GGUF "
            "reader ignores, so only llama.cpp itself can verify it, and llama-cpp-python is not installed",
            "pip install 'qtune[llamacpp]' (builds llama.cpp, a few minutes), then export again",
        )
    return model_type


def _rope_type(config: dict) -> str | None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def rope_freq_factors(cfg):
    """llama.cpp's rope_freqs for a RoPE-scaled model, None for plain RoPE: per rotary frequency, the default
    inverse frequency over the model's, both from transformers' own RoPE functions (llama.cpp divides each
    position's angle by it). Only for scalings that change frequencies alone (attention factor 1)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = _rope_type(cfg.to_dict())
    if rope_type in (None, "default"):
        return None
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    assert attention_factor == 1.0, rope_type  # check_gguf_architecture admits only such types
    dim = 2 * inv_freq.shape[0]
    default = 1.0 / _rope_theta(cfg) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    return (default / inv_freq.float()).numpy()


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


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
    factors = rope_freq_factors(cfg)
    if factors is not None:
        out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.astype(np.float32), None))
    return out


# --------------------------------------------------------------------------- tokenizer


def _parts(part) -> list[dict]:
    """A tokenizer.json normalizer / pre-tokenizer / decoder and, for a Sequence, its members (flattened)."""
    if not part:
        return []
    members = part.get("normalizers", part.get("pretokenizers", part.get("decoders", [])))
    return [part] + [p for member in members for p in _parts(member)]


def tokenizer_kind(spec: dict) -> str:
    """tokenizer.ggml.model for a tokenizer.json: "gpt2" (byte-level BPE: Qwen2, Llama 3) or "llama"
    (sentencepiece-style BPE with byte fallback and "▁" for spaces: Llama 2, Mistral v0.1); else refused."""
    model = spec.get("model") or {}
    parts = _parts(spec.get("pre_tokenizer")) + _parts(spec.get("decoder")) + _parts(spec.get("normalizer"))
    types = {p.get("type") for p in parts}
    spaces = "Metaspace" in types or any(p.get("type") == "Replace" and p.get("content") == "▁" for p in parts)
    if model.get("type") == "BPE" and "ByteLevel" in types:
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback") and spaces:
        return "llama"
    kind = model.get("type") if model.get("type") != "BPE" else "BPE that is neither byte-level nor sentencepiece-style"
    raise QtuneError(
        f"GGUF export: the tokenizer is {kind}; qtune writes byte-level BPE (Qwen2, Llama 3) and sentencepiece-style "
        "BPE with byte fallback (Llama 2, Mistral v0.1) tokenizers only",
        "other tokenizers (WordPiece, Unigram, WordLevel, …) are not exported (nothing was written)",
    )


def _tokenizer_metadata(tokenizer, n_vocab: int) -> dict:
    """The tokenizer as llama.cpp's tokenizer.ggml.* keys (see tokenizer_kind for the two kinds written)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = tokenizer_kind(spec)
    model = spec["model"]
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
        if kind == "llama" and token == tokenizer.unk_token:
            types[i] = UNKNOWN  # as sentencepiece marks it
        elif token in added:
            types[i] = CONTROL if added[token].get("special") else USER_DEFINED
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types[i] = BYTE  # byte fallback: llama.cpp finds a byte's token by this type and spelling
        else:
            types[i] = NORMAL
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    probe = tokenizer("hello")["input_ids"]
    meta = {
        "model": kind,
        "tokens": tokens,
        "types": types,
        "special": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "unk": tokenizer.unk_token_id,
            "pad": tokenizer.pad_token_id,
        },
        "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "add_eos": bool(probe) and probe[-1] == tokenizer.eos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "notes": [],
    }
    if kind == "gpt2":
        meta["merges"] = [" ".join(m) for m in merges]
        # The split regex, named as llama.cpp names it: a Split regex transformers' loader knows by name, or
        # GPT-2's own (a ByteLevel pre-tokenizer that splits by itself); else "default".
        meta["pre"] = "default"
        pre = _parts(spec.get("pre_tokenizer"))
        split = next((p["pattern"].get("Regex") for p in pre if p["type"] == "Split"), None)
        if split is not None:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

            meta["pre"] = next((k for k, v in GGUF_PRE_TOKENIZER_SPLITS.items() if v == split), "default")
        elif any(p["type"] == "ByteLevel" and p.get("use_regex", True) for p in pre):
            meta["pre"] = "gpt-2"
        return meta
    # "llama": scores instead of merges (see the module docstring). A piece scores -(1 + the rank of the
    # first merge that makes it), so the merges come back in their order; pieces no merge makes
    # (characters, bytes, specials) score 0, as sentencepiece scores them.
    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    meta["scores"] = [-1.0 - first[t] if t in first else 0.0 for t in tokens]
    metaspace = [p for p in _parts(spec.get("pre_tokenizer")) if p["type"] == "Metaspace"]
    meta["add_space_prefix"] = metaspace[0].get("prepend_scheme") != "never" if metaspace else True
    # From scores, any two pieces that join into a piece merge. A tokenizer converted from a sentencepiece
    # model has all those merges; one trained as plain BPE usually lacks some, and then tokenizes differently.
    pieces, known = model["vocab"], set(merges)
    missing = [
        (t[:k], t[k:])
        for t, i in pieces.items()
        if types[i] == NORMAL
        for k in range(1, len(t))
        if t[:k] in pieces and t[k:] in pieces and (t[:k], t[k:]) not in known
    ]
    if not any(p["type"] == "Prepend" for p in _parts(spec.get("normalizer"))):
        meta["notes"].append(
            "llama.cpp puts a '▁' at the start of a text and after each special token even where a space already is "
            "(as Llama 2's original tokenizer.json does, with a Prepend normalizer); this tokenizer's Metaspace does "
            "not, so llama.cpp gives other ids to a text that starts with a space or has a special token inside"
        )
    if missing:
        meta["notes"].append(
            f"{len(missing)} pair(s) of pieces, e.g. {missing[0]}, join into a piece but are not among the tokenizer's "
            "merges; from the GGUF file's scores they do merge, so some words may tokenize differently there"
        )
    return meta


def end_of_turn_token(model, tokenizer) -> int | None:
    """llama.cpp's eot (tokenizer.ggml.eot_token_id) for a model whose generation config stops at more than eos
    (qtune's merge writes a run's stop tokens there: the trained end-of-turn, then eos): the chat template's
    end-of-turn when it is one of them, else the first stop token that is not eos; None when eos is the only one."""
    from qtune.data.turns import end_of_turn_id

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    template_end = end_of_turn_id(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    if template_end is not None and template_end in stops:
        return template_end
    return next((i for i in stops if i != tokenizer.eos_token_id), None)


# --------------------------------------------------------------------------- writing


def write_gguf(model, tokenizer, path: Path, qtype: str, name: str) -> list[str]:
    """One GGUF file at `path`: architecture metadata, tokenizer, tensors (f16 or q8_0). Returns notes on
    the tokenizer for the user (empty when there is nothing to say)."""
    gguf = _import_gguf()
    cfg = model.config
    model_type = cfg.model_type
    arch = ARCHES[model_type]
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tok = _tokenizer_metadata(tokenizer, n_vocab)
    eot = end_of_turn_token(model, tokenizer)  # where llama.cpp stops besides eos: the trained end-of-turn
    if eot is not None and eot < n_vocab:
        tok["special"]["eot"] = eot
    tensors = _tensors(model, model_type, qtype, gguf)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

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
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model(tok["model"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    if tok["model"] == "gpt2":
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_merges(tok["merges"])
    else:
        writer.add_token_scores(tok["scores"])
        writer.add_add_space_prefix(tok["add_space_prefix"])
    for key, token_id in tok["special"].items():
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])
    for tensor_name, data, raw in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tok["notes"]


# --------------------------------------------------------------------------- verification


def read_back_with_transformers(path: Path, merged, tokenizer, qtype: str, prompts) -> dict:
    """Load `path` back with transformers' GGUF support; compare tokenizer ids and logits with `merged`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.logits import compare_logits

    folder, file = str(path.parent), path.name
    # transformers' reader ignores rope_freqs: a RoPE-scaled file is read with the merged model's config (its
    # weights and tokenizer checked here), and the scaling by llama.cpp itself (read_back_with_llama_cpp).
    config = {"config": merged.config} if rope_freq_factors(merged.config) is not None else {}
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32, **config).eval()
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
    result = compare_logits(theirs, ours)
    tolerance = _check_tolerance(result, qtype, "transformers'")
    return {"type": qtype, "comparison": result.__dict__, "tolerance": tolerance, "text": result.text()}


def _check_tolerance(result, qtype: str, reader: str) -> str:
    """The tolerance text for `qtype`; a QtuneError naming `reader` when `result` exceeds it."""
    rel, min_top1 = TOLERANCE[qtype]
    tolerance = f"max |Δlogit| ≤ {rel:g} × max(1, max|logit| = {result.scale:.3g}), top-1 ≥ {100 * min_top1:g}%"
    if not result.within(rel, min_top1):
        raise QtuneError(
            f"GGUF verification failed ({qtype}): {reader} logits are off, {result.text()} exceeds the tolerance "
            f"({tolerance}); nothing was written",
            "--debug shows details",
        )
    return tolerance


def read_back_with_llama_cpp(path: Path, merged, tokenizer, qtype: str, prompts) -> dict | None:
    """Read `path` with llama.cpp itself (llama-cpp-python), when installed: it must encode the prompts to the
    same ids and its logits must meet the same tolerance. None when llama-cpp-python is not installed."""
    if not llama_cpp_available():
        return None
    import llama_cpp
    import torch

    from qtune.logits import compare_logits

    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    llm = llama_cpp.Llama(str(path), n_ctx=max(map(len, encoded)) + 8, logits_all=True, verbose=False)
    try:
        ours, theirs = [], []
        for prompt, ids in zip(prompts, encoded, strict=True):
            bos = bool(ids) and ids[0] == tokenizer.bos_token_id
            got = llm.tokenize(prompt.encode("utf-8"), add_bos=bos, special=True)
            if got != ids:
                raise QtuneError(
                    f"GGUF verification failed: llama.cpp encodes {prompt!r} differently ({got} vs {ids}); "
                    "nothing was written",
                    "the tokenizer's pre-tokenization is not one llama.cpp describes",
                )
            llm.reset()
            llm.eval(ids)
            theirs.append(torch.tensor(llm.scores[: len(ids)]))
            with torch.no_grad():
                ours.append(merged(input_ids=torch.tensor([ids])).logits[0].float())
    finally:
        llm.close()
    result = compare_logits(theirs, ours)
    _check_tolerance(result, qtype, "llama.cpp's")
    return {"version": llama_cpp.__version__, "comparison": result.__dict__, "text": result.text()}


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
    from qtune.logits import VERIFY_PROMPTS

    src, dest = Path(source), Path(out)
    if qtype not in TYPES:
        raise QtuneError(f"--type: unknown GGUF type '{qtype}'", f"one of {', '.join(TYPES)}")
    check_out(dest, overwrite)
    prompts = tuple(prompts) or VERIFY_PROMPTS
    if RunDir.is_run(src):
        run = RunDir.open(src)  # no adapter → error before anything loads
        from qtune.model import refuse_reward_run

        refuse_reward_run(run.recipe, run.path, "export-gguf")
        base = run.recipe.model.name
        if Path(base).is_dir():
            check_gguf_architecture(_read_config(Path(base)), base)
        else:
            from transformers import AutoConfig

            check_gguf_architecture(
                AutoConfig.from_pretrained(base, revision=run.recipe.model.revision).to_dict(), base
            )
        _import_gguf()
        with tempfile.TemporaryDirectory(
            prefix=".qtune-gguf-merge-", dir=dest.parent if dest.parent.exists() else None
        ) as tmp:
            from qtune.merging import merge

            log(f"qtune: {src} is a run directory: merging its adapter onto the dequantized base first")
            merge(src, out=Path(tmp) / "merged", dtype="fp32", onto="dequantized", log=log)
            return _export_folder(Path(tmp) / "merged", dest, qtype, prompts, name=src.name, log=log)
    if not (src / "config.json").is_file():
        raise QtuneError(
            f"{src}: neither a run directory (recipe.yaml) nor a model folder (config.json)",
            "give the output_dir of `qtune train`, or a merged model folder (`qtune merge --out`)",
        )
    check_gguf_architecture(_read_config(src), str(src))
    _import_gguf()
    return _export_folder(src, dest, qtype, prompts, name=src.name, log=log)


def _export_folder(folder: Path, dest: Path, qtype: str, prompts, name: str, log) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.model import check_weight_files

    check_weight_files(str(folder), allow_pickle=False, flag=None)
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", suffix=".gguf", dir=dest.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it private (0600); the file follows the umask
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        for note in write_gguf(merged, tokenizer, tmp, qtype, name):
            log(f"qtune: note: {note}")
        report = read_back_with_transformers(tmp, merged, tokenizer, qtype, prompts)
        report["llama_cpp"] = read_back_with_llama_cpp(tmp, merged, tokenizer, qtype, prompts)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = dest.stat().st_size
    report.update({"out": str(dest), "bytes": size})
    log(f"qtune: GGUF ({qtype}) loaded back with transformers vs the merged model: {report['text']}")
    if report["llama_cpp"]:
        log(f"qtune: GGUF ({qtype}) read by llama.cpp (llama-cpp-python {report['llama_cpp']['version']}), same token "
            f"ids: {report['llama_cpp']['text']}")  # fmt: skip
    else:
        log("qtune: llama.cpp itself did not check the file (pip install 'qtune[llamacpp]' to check with it too)")
    log(f"qtune: verified within tolerance ({report['tolerance']})")
    log(f"qtune: wrote {dest} ({size / 2**20:.2f} MiB)")
    return report
