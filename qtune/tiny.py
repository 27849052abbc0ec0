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


# A small made-up corpus for the sentencepiece-style tokenizer: ASCII only, and no newline, so that a newline,
# an emoji or a CJK character falls back to byte tokens (<0x0A>, …) as it does in Llama 2.
SENTENCEPIECE_CORPUS = (
    "The meaning of life is to spell numbers: one two three four five six seven eight nine ten.",
    "Question: what is two plus two? Answer: four. What is the last digit of 1234567890? Zero.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Hello world! Please count the letters in each word, then reverse the words and say the sum.",
    "The user asks a question and the assistant gives an answer, please be brief and true.",
)


def build_sentencepiece_tokenizer(vocab_size: int = 384, legacy: bool = False):
    """A tiny tokenizer shaped like Llama 2's and Mistral v0.1's: BPE with byte fallback over "▁"-marked
    words, `<unk>` `<s>` `</s>` at ids 0-2, the byte tokens `<0x00>`..`<0xFF>` at 3-258, BOS added.

    Trained with `tokenizers`' BPE trainer on SENTENCEPIECE_CORPUS, then given every merge its vocabulary
    implies (each pair of pieces that joins into a piece, ranked by when that piece was learned), as the
    tokenizer.json converted from a sentencepiece model has them. `legacy=False` gives transformers'
    LlamaTokenizer (a Metaspace pre-tokenizer, "▁" prepended to the first word only); `legacy=True` a
    PreTrainedTokenizerFast with the original Llama 2 tokenizer.json pipeline (Prepend + Replace normalizer,
    "▁" also prepended after each special token, a leading space kept as an extra "▁").
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<unk>", "<s>", "</s>"]
    n_pieces = vocab_size - len(specials) - 256
    learner.train_from_iterator(
        SENTENCEPIECE_CORPUS * 10, trainers.BpeTrainer(vocab_size=n_pieces, show_progress=False)
    )
    learned = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + list(learned["vocab"]))}
    first = {}  # piece → rank of the merge that first made it
    for rank, (left, right) in enumerate(learned["merges"]):
        first.setdefault(left + right, rank)
    merges = sorted(
        ((p[:k], p[k:]) for p in first for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab),
        key=lambda pair: first["".join(pair)],
    )
    if not legacy:
        return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
