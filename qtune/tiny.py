"""Build a tiny, randomly initialised causal LM and a word-level tokenizer on local disk.

The offline demo, the tests and the benchmarks use it: no model hub is reachable there, and a saved
folder goes through exactly the same `from_pretrained` path as a hub model does.
"""

from __future__ import annotations

from pathlib import Path

# ChatML with `{% generation %}` markers, so TRL can compute answer-only loss on conversations.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
DIGITS = [str(d) for d in range(10)]
BASE_WORDS = (
    "zero one two three four five six seven eight nine ten user assistant system what is the of "
    "and a an in to spell say number digit digits last first answer question please word words "
    "count letters reverse sum plus minus equals yes no true false hello world"
).split()
PUNCT = list(".,:;?!()[]'\"-+=*/#\n")

ARCHITECTURES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "mistral": "MistralConfig",
}


def build_tokenizer(extra_words: list[str] | tuple[str, ...] = ()):
    """A word-level tokenizer (digits split one by one) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(SPECIAL_TOKENS + DIGITS + PUNCT + BASE_WORDS + list(extra_words)))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(True)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    extra_words: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    initializer_range: float | None = None,
) -> Path:
    """Save a random `arch` model and its tokenizer to `out_dir` and return the path.

    Sizes stay multiples of 16 with at least 2 KV heads: bitsandbytes' CPU 4-bit kernel needs that.
    `initializer_range` (the std of the random weights; None keeps the architecture's default, 0.02) set
    larger gives the frozen random output layer a wider logit range, so a LoRA run's loss can fall further.
    """
    import torch
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    out = Path(out_dir)
    tokenizer = build_tokenizer(extra_words)
    vocab_size = -(-len(tokenizer) // 16) * 16
    config_cls = getattr(transformers, ARCHITECTURES[arch])
    init = {} if initializer_range is None else {"initializer_range": initializer_range}
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **init,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
