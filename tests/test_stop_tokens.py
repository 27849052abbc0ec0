"""Stop tokens that serve: a base model whose eos is not the end-of-turn of the chat template it is trained with
(Qwen2.5 base + ChatML: <|endoftext|> vs <|im_end|>) learns to close answers with <|im_end|>, and every place the
run is used stops there by itself: the adapter's generation_config.json and summary.json, merge's output, chat,
the GGUF's eot. Trained once (a constant answer, a few steps at a high learning rate), merged once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_qtune, run_qtune_in_process, write_jsonl

QUESTIONS = [
    f"what is {a} plus {b}?" for a in "one two three four five".split() for b in "six seven eight nine".split()
]
ANSWER = "yes"
PROMPT = "what is three plus eight?"
EOT, EOS, PAD = "<|im_end|>", "<|endoftext|>", "<pad>"
MAX_NEW = 24


def build_base(out: Path) -> Path:
    """A tiny random Qwen2 with a byte-level BPE tokenizer (so it exports to GGUF) shaped like Qwen2.5 base's:
    eos <|endoftext|>, the ChatML tokens in the vocabulary, no chat template of its own."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS, "<|im_start|>", EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([*QUESTIONS, "user assistant system yes no"] * 10, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    config = transformers.Qwen2Config(
        vocab_size=-(-len(tokenizer) // 16) * 16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # the base stops at eos only
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stop_run(tmp_path_factory) -> Path:
    """The run dir of one short QLoRA training with the built-in ChatML template, merged."""
    from qtune.merging import merge

    root = tmp_path_factory.mktemp("stop-tokens")
    base = build_base(root / "base")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in QUESTIONS]
    recipe = {
        "model": {"name": str(base)},
        "quantization": {"bits": 4},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {
            "datasets": [{"path": str(write_jsonl(root / "train.jsonl", rows))}],
            "max_length": 64,
            "chat_template": "chatml",
        },  # fmt: skip
        "training": {
            "max_steps": 20,
            "micro_batch_size": 8,
            "grad_accum": 1,
            "lr": 1e-2,
            "logging_steps": 5,
            "gradient_checkpointing": False,
        },  # fmt: skip
        "output_dir": str(root / "run"),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_qtune_in_process("train", root / "recipe.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    merge(root / "run", log=lambda *_: None)
    return root / "run"


def _ids(tokenizer, *tokens: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(tokens))


def _greedy(model, tokenizer, **settings) -> list[str]:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, **settings)
    return tokenizer.convert_ids_to_tokens(out[0, inputs["input_ids"].shape[1] :].tolist())


@pytest.mark.slow
def test_the_adapter_and_the_summary_record_the_trained_end_of_turn_then_eos(stop_run):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(stop_run / "adapter")
    eot, eos, pad = _ids(tokenizer, EOT, EOS, PAD)
    assert eot != eos
    summary = json.loads((stop_run / "summary.json").read_text(encoding="utf-8"))
    assert summary["stop_tokens"] == [{"id": eot, "token": EOT}, {"id": eos, "token": EOS}]
    config = GenerationConfig.from_pretrained(stop_run / "adapter")
    assert config.eos_token_id == [eot, eos] and config.pad_token_id == pad
    assert tokenizer.eos_token == EOS  # the tokenizer's own eos is left as it is (TRL appends it to text rows)


@pytest.mark.slow
def test_the_merged_model_stops_by_itself_at_the_trained_end_of_turn(stop_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    merged = stop_run / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert model.generation_config.eos_token_id == _ids(tokenizer, EOT, EOS)
    assert json.loads((merged / "qtune_merge.json").read_text(encoding="utf-8"))["stop_tokens"] == _ids(
        tokenizer, EOT, EOS
    )

    answer = _greedy(model, tokenizer)  # the merged model's own generation_config.json, nothing else
    assert len(answer) < MAX_NEW and answer[-1] == EOT, answer
    assert tokenizer.convert_tokens_to_string(answer[:-1]) == ANSWER

    # With eos alone (the base's generation config: what merge wrote before), it runs on past the end-of-turn.
    base_config = GenerationConfig.from_pretrained(stop_run.parent / "base")
    assert base_config.eos_token_id == tokenizer.eos_token_id
    eos_only = _greedy(model, tokenizer, generation_config=base_config)
    assert eos_only[: len(answer)] == answer and len(eos_only) == MAX_NEW, eos_only


@pytest.mark.slow
def test_chat_stops_at_the_trained_end_of_turn_on_the_adapter_and_on_the_merged_model(stop_run):
    adapter = run_qtune("chat", stop_run, "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW))  # the real CLI
    assert adapter.returncode == 0, adapter.stderr[-3000:]
    assert adapter.stdout.strip() == ANSWER
    merged = run_qtune_in_process("chat", stop_run, "--merged", "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW))
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert merged.stdout.strip() == ANSWER


@pytest.mark.slow
def test_the_gguf_names_the_trained_end_of_turn_as_eot_and_keeps_eos(stop_run, tmp_path):
    gguf = pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stop_run / "merged")
    eot, eos = _ids(tokenizer, EOT, EOS)
    out = tmp_path / "run.gguf"
    result = run_qtune_in_process("export-gguf", stop_run / "merged", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.eot_token_id"].contents() == eot
    assert fields["tokenizer.ggml.eos_token_id"].contents() == eos

    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(str(out), n_ctx=128, verbose=False)
    try:
        vocab = llm._model.vocab
        assert llama_cpp.llama_vocab_eot(vocab) == eot and llama_cpp.llama_vocab_eos(vocab) == eos
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                               tokenize=False)  # fmt: skip
        done = llm.create_completion(prompt, max_tokens=MAX_NEW, temperature=0.0)["choices"][0]
        assert done["finish_reason"] == "stop" and done["text"].strip() == ANSWER, done
    finally:
        llm.close()


def test_text_rows_stop_at_eos_alone_and_an_adapter_saved_without_a_generation_config_stops_at_its_template():
    """Text rows train eos (TRL appends it): eos is the only stop token. An adapter saved before qtune wrote
    generation_config.json stops at what its tokenizer's chat template closes a turn with, then eos."""
    import tempfile

    from qtune.stops import saved_stops, stop_tokens, with_stops
    from qtune.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.eos_token = "</s>"  # a base's eos, not the ChatML end-of-turn
    eot, eos = _ids(tokenizer, EOT, "</s>")
    assert stop_tokens(tokenizer, eos) == [eos] and stop_tokens(tokenizer, None) == [eos]
    assert stop_tokens(tokenizer, eot) == [eot, eos]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        assert saved_stops(folder, tokenizer) == [eot, eos]
        with_stops(None, [eot, eos], tokenizer).save_pretrained(folder)
        assert saved_stops(folder, tokenizer) == [eot, eos]
    tokenizer.chat_template = None
    with tempfile.TemporaryDirectory() as folder:
        assert saved_stops(folder, tokenizer) == [eos]
