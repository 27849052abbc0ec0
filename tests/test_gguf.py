"""export-gguf: written with the gguf package, read back with transformers' GGUF support, logits compared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import spell_rows, write_jsonl

pytest.importorskip("gguf")

from qtune import gguf_export  # noqa: E402

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
TEXTS = [
    "The meaning of life is to spell numbers: one two three four.",
    "Question: what is two plus two?\nAnswer: four",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
]


def build_model(out: Path, arch: str, tokenizer, seed: int = 0, rope: dict | None = None) -> Path:
    """A tiny random `arch` model saved with `tokenizer` (qtune.tiny's word-level tokenizer has no GGUF form)."""
    import transformers

    config_cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=-(-len(tokenizer) // 16) * 16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.1,  # a wider logit range than the default 0.02: fewer near-ties in top-1
        **({"rope_parameters": rope} if rope else {}),
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def bpe_tokenizer():
    """A small byte-level BPE tokenizer (the kind Qwen2 and Llama 3 use)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 10, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Byte-level BPE: llama, qwen2, mistral. Sentencepiece-style (qtune.tiny, like Llama 2's): sp-llama,
    sp-mistral (another seed, with a chat template), and sp-legacy (Llama 2's original tokenizer.json pipeline)."""
    from qtune.tiny import build_sentencepiece_tokenizer

    root = tmp_path_factory.mktemp("gguf-models")
    built = {arch: build_model(root / arch, arch, bpe_tokenizer()) for arch in ("llama", "qwen2", "mistral")}
    chat = build_sentencepiece_tokenizer()
    chat.chat_template = MISTRAL_TEMPLATE
    built["sp-llama"] = build_model(root / "sp-llama", "llama", build_sentencepiece_tokenizer())
    built["sp-mistral"] = build_model(root / "sp-mistral", "mistral", chat, seed=1)
    built["sp-legacy"] = build_model(root / "sp-legacy", "llama", build_sentencepiece_tokenizer(legacy=True))
    return built


def qtune_main(capsys, *args) -> tuple[int, str, str]:
    from qtune.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def test_permute_rotary_is_undone_by_the_transformers_loader():
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)  # 8 heads of dim 16
    ours = gguf_export.permute_rotary(w, 8)
    assert not np.array_equal(ours, w)
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(ours, 8, 8), w)
    # within a head: rows (0, 8) of HF's halves become neighbours (0, 1) in GGML's interleaved layout
    assert np.array_equal(ours[[0, 1, 2, 3]], w[[0, 8, 1, 9]])


@pytest.mark.parametrize(
    "arch,qtype",
    [
        ("llama", "f16"),
        ("llama", "q8_0"),
        ("qwen2", "f16"),
        ("qwen2", "q8_0"),
        ("mistral", "f16"),
        ("sp-llama", "f16"),
        ("sp-llama", "q8_0"),
        ("sp-mistral", "f16"),
        ("sp-mistral", "q8_0"),
        ("sp-legacy", "f16"),
    ],
)
def test_export_gguf_round_trip_matches_the_merged_model(models, tmp_path, capsys, arch, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / f"{arch}-{qtype}.gguf"
    code, stdout, stderr = qtune_main(capsys, "export-gguf", models[arch], "--out", out, "--type", qtype)
    assert code == 0, stderr
    assert "verified within tolerance" in stdout and out.is_file()
    print(stdout)  # the measured diff, visible with -s
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left beside it

    # Independently of the command's own check: transformers reads the file, same tokens, close logits.
    merged = AutoModelForCausalLM.from_pretrained(models[arch]).eval()
    tokenizer = AutoTokenizer.from_pretrained(models[arch])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = TEXTS[1]
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert gguf_tokenizer.decode(gguf_tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    a, b = _logits(loaded, ids), _logits(merged, ids)
    diff = (a - b).abs().max().item()
    limit = (0.01 if qtype == "f16" else 0.05) * max(1.0, b.abs().max().item())
    assert diff <= limit, (diff, limit)
    if qtype == "f16":
        assert torch.equal(a.argmax(-1), b.argmax(-1))


# Spaces at either end and doubled, newlines, tabs, digits, emoji and CJK (byte fallback), accents, specials inside.
SP_TEXTS = [
    "Hello world",
    "two plus two is four",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "double  space,   triple",
    " ",
    "",
    "new\nline\n\nand a tab\t",
    "digits 0123456789, 3.14 and 1,000,000",
    "emoji 🙂👍🏽!",
    "中文 and 日本語のテキスト",
    "café naïve",
    "text with </s> inside",
    "<s>starts with bos",
    "an <unk> here",
]


@pytest.mark.parametrize("arch", ["sp-llama", "sp-legacy"])
def test_sentencepiece_tokenizer_survives_the_gguf_round_trip(models, tmp_path, capsys, arch):
    """The file holds llama.cpp's sentencepiece keys; transformers rebuilds from them the same merges, in
    order, and a tokenizer that gives the original's ids on varied texts and decodes them back."""
    import json

    from transformers import AutoTokenizer
    from transformers.integrations.gguf import get_gguf_tokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import get_merges

    out = tmp_path / "sp.gguf"
    code, stdout, stderr = qtune_main(capsys, "export-gguf", models[arch], "--out", out)
    assert code == 0, stderr
    assert "not among the tokenizer's merges" not in stdout  # every merge the scores imply is one of its own
    assert ("llama.cpp gives other ids" in stdout) == (arch == "sp-llama")  # Metaspace, not Llama 2's Prepend
    tokenizer = AutoTokenizer.from_pretrained(models[arch])
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)

    _, file_tokenizer, _ = get_gguf_tokenizer(str(out))
    tokens, types = file_tokenizer["tokens"], file_tokenizer["token_type"]
    assert file_tokenizer["tokenizer_type"] == "llama" and "merges" not in file_tokenizer
    assert [types[tokens.index(t)] for t in ("<unk>", "<s>", "</s>", "<0x0A>", "▁two")] == [2, 3, 3, 6, 1]
    merges = [tuple(m) for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]
    rebuilt = get_merges(file_tokenizer)  # from the scores; pairs making the same piece may swap places
    assert sorted(rebuilt) == sorted(merges) and [a + b for a, b in rebuilt] == [a + b for a, b in merges]

    assert "<0xF0>" in tokenizer.convert_ids_to_tokens(tokenizer("🙂")["input_ids"])  # byte fallback, as Llama 2
    texts = SP_TEXTS
    if arch == "sp-legacy":
        # Llama 2's original pipeline prepends "▁" to a text that already starts with a space and after each
        # special token; transformers' GGUF reader (a Metaspace, "first") does neither, so those differ.
        texts = [t for t in texts if not t.startswith(" ") and "<" not in t]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert gguf_tokenizer(text)["input_ids"] == ids, text
        assert gguf_tokenizer.decode(ids) == tokenizer.decode(ids)
        if not text.startswith(" ") and "<" not in text:
            assert gguf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_sentencepiece_chat_template_and_special_ids_are_kept(models, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "mistral.gguf"
    code, _, stderr = qtune_main(capsys, "export-gguf", models["sp-mistral"], "--out", out)
    assert code == 0, stderr
    tokenizer = AutoTokenizer.from_pretrained(models["sp-mistral"])
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    chat = [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]
    assert gguf_tokenizer.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(
        chat, tokenize=False
    )
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(gguf_tokenizer, name) == getattr(tokenizer, name), name


def test_a_bpe_tokenizer_missing_merges_its_pieces_imply_gets_a_note():
    """Trained as plain BPE, a tokenizer lacks merges that a GGUF's scores imply: the export says so."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qtune.tiny import SENTENCEPIECE_CORPUS

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(SENTENCEPIECE_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    notes = gguf_export._tokenizer_metadata(fast, 208)["notes"]
    assert any("are not among the tokenizer's merges" in note for note in notes), notes


def test_tokenizer_kinds_gguf_does_not_describe_are_refused():
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    from qtune.errors import QtuneError

    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0)], unk_id=0))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    no_fallback = Tokenizer(models.BPE({"<unk>": 0, "▁": 1, "a": 2}, [], unk_token="<unk>"))
    no_fallback.pre_tokenizer = pre_tokenizers.Metaspace()
    for tok, kind in ((unigram, "Unigram"), (wordpiece, "WordPiece"), (no_fallback, "BPE that is neither")):
        with pytest.raises(QtuneError) as exc:
            gguf_export.tokenizer_kind(json.loads(tok.to_str()))
        assert f"the tokenizer is {kind}" in str(exc.value)
        assert "byte-level BPE (Qwen2, Llama 3) and sentencepiece-style BPE" in str(exc.value)


def test_export_gguf_refuses_an_existing_out_unless_overwrite(models, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"keep me")
    code, _, stderr = qtune_main(capsys, "export-gguf", models["qwen2"], "--out", out)
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert out.read_bytes() == b"keep me"
    code, _, stderr = qtune_main(capsys, "export-gguf", models["qwen2"], "--out", out, "--overwrite")
    assert code == 0, stderr
    assert out.read_bytes()[:4] == b"GGUF"


def test_export_gguf_refuses_unsupported_architectures_and_writes_nothing(tmp_path, capsys):
    import transformers

    for cls, kwargs in (
        ("GPT2Config", {"n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 64}),
        ("OPTConfig", {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 64}),
    ):
        folder = tmp_path / cls
        getattr(transformers, cls)(**kwargs).save_pretrained(folder)  # the config is all that is read
        out = tmp_path / "out" / "model.gguf"
        code, stdout, stderr = qtune_main(capsys, "export-gguf", folder, "--out", out)
        assert code == 2, stderr
        assert stderr.startswith("error: ") and "does not support the architecture" in stderr
        assert "llama, mistral, qwen2" in stderr
        assert not out.parent.exists()


@pytest.mark.parametrize(
    "arch, rope, llama_cpp, expect",
    [
        ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, True, "'yarn'"),
        ("qwen2", {"rope_type": "linear", "factor": 2.0}, True, "'linear' is not exported"),
        ("llama", {"rope_type": "linear", "factor": 2.0}, False, "pip install 'qtune[llamacpp]'"),
    ],
)
def test_export_gguf_refuses_rope_scaling_it_cannot_write_or_verify(tmp_path, capsys, monkeypatch, arch, rope,
                                                                    llama_cpp, expect):  # fmt: skip
    import transformers

    monkeypatch.setattr(gguf_export, "llama_cpp_available", lambda: llama_cpp)
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    config_cls(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, rope_parameters=rope).save_pretrained(
        tmp_path / "src"
    )  # the config is all that is read
    out = tmp_path / "out" / "model.gguf"
    code, _, stderr = qtune_main(capsys, "export-gguf", tmp_path / "src", "--out", out)
    assert code == 2, stderr
    assert stderr.startswith("error: ") and expect in stderr and "RoPE scaling" in stderr
    assert not out.parent.exists()


def test_export_gguf_refuses_a_tokenizer_gguf_cannot_describe(tmp_path, capsys):
    from qtune.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "wordlevel", arch="llama")  # WordLevel tokenizer
    out = tmp_path / "model.gguf"
    code, _, stderr = qtune_main(capsys, "export-gguf", model, "--out", out)
    assert code == 2 and "WordLevel" in stderr and "byte-level BPE" in stderr and "sentencepiece-style" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wordlevel"]


def test_export_gguf_refuses_a_run_without_adapter_and_odd_sources(models, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    recipe = {
        "model": {"name": str(models["llama"])},
        "data": {"datasets": [{"path": str(write_jsonl(tmp_path / "d.jsonl", spell_rows(4)))}]},
        "output_dir": str(run),
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "x.gguf"
    code, _, stderr = qtune_main(capsys, "export-gguf", run, "--out", out)
    assert code == 2 and "the run has no adapter" in stderr and not out.exists()
    code, _, stderr = qtune_main(capsys, "export-gguf", tmp_path / "missing", "--out", out)
    assert code == 2 and "neither a run directory" in stderr and not out.exists()
    code, _, stderr = qtune_main(capsys, "export-gguf", models["llama"], "--out", tmp_path)
    assert code == 2 and "is a directory" in stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "quantization",
    [{"bits": 4}, {"backend": "quanto", "bits": 8}, {"backend": "torchao", "bits": 8}, {"backend": "hqq", "bits": 4}],
    ids=["bnb-4", "quanto-8", "torchao-8", "hqq-4"],
)
def test_export_gguf_of_a_run_merges_onto_the_dequantized_base_first(models, tmp_path, capsys, quantization):
    """A run directory (recipe + a LoRA adapter with non-zero B, as training leaves it) is merged by
    qtune.merging onto the dequantized base of the run's backend, then written and verified."""
    backend = quantization.get("backend", "bnb")
    pytest.importorskip({"bnb": "bitsandbytes", "quanto": "optimum.quanto"}.get(backend, backend))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    base = models["llama"]
    recipe = {
        "model": {"name": str(base)},
        "quantization": quantization,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"datasets": [{"path": str(write_jsonl(tmp_path / "d.jsonl", spell_rows(4)))}]},
        "output_dir": str(run),
    }
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    torch.manual_seed(1)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    )
    peft_model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "adapter")

    out = tmp_path / "gguf" / "run.gguf"
    code, stdout, stderr = qtune_main(capsys, "export-gguf", run, "--out", out, "--type", "q8_0")
    assert code == 0, stderr
    print(stdout)
    assert "merging its adapter onto the dequantized base" in stdout and "verified within tolerance" in stdout
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["run.gguf"]  # temp merge removed
    assert not (run / "merged").exists()
