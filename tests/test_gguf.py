"""export-gguf: written with the gguf package, read back with transformers' GGUF support, logits compared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import spell_rows, write_jsonl

pytest.importorskip("gguf")

from qtune import gguf_export  # noqa: E402

TEXTS = [
    "The meaning of life is to spell numbers: one two three four.",
    "Question: what is two plus two?\nAnswer: four",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
]


def build_bpe_model(out: Path, arch: str, seed: int = 0) -> Path:
    """A tiny random `arch` model with a small byte-level BPE tokenizer (the kind Qwen2 and Llama 3 use, and
    one a GGUF file describes; qtune.tiny's word-level tokenizer has no GGUF form)."""
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
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    config_cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=-(-len(fast) // 16) * 16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.1,  # a wider logit range than the default 0.02: fewer near-ties in top-1
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    return {arch: build_bpe_model(root / arch, arch) for arch in ("llama", "qwen2", "mistral")}


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
    "arch,qtype", [("llama", "f16"), ("llama", "q8_0"), ("qwen2", "f16"), ("qwen2", "q8_0"), ("mistral", "f16")]
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
    assert gguf_tokenizer.decode(gguf_tokenizer(text)["input_ids"]) == text
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    a, b = _logits(loaded, ids), _logits(merged, ids)
    diff = (a - b).abs().max().item()
    limit = (0.01 if qtype == "f16" else 0.05) * max(1.0, b.abs().max().item())
    assert diff <= limit, (diff, limit)
    if qtype == "f16":
        assert torch.equal(a.argmax(-1), b.argmax(-1))


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


def test_export_gguf_refuses_a_tokenizer_gguf_cannot_describe(tmp_path, capsys):
    from qtune.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "wordlevel", arch="llama")  # WordLevel tokenizer
    out = tmp_path / "model.gguf"
    code, _, stderr = qtune_main(capsys, "export-gguf", model, "--out", out)
    assert code == 2 and "WordLevel" in stderr and "byte-level BPE" in stderr
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
def test_export_gguf_of_a_run_merges_onto_the_dequantized_base_first(models, tmp_path, capsys):
    """A run directory (recipe + a LoRA adapter with non-zero B, as training leaves it) is merged by
    export.merge onto the dequantized 4-bit base, then written and verified."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    base = models["llama"]
    recipe = {
        "model": {"name": str(base)},
        "quantization": {"bits": 4},
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
