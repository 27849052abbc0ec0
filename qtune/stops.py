"""The tokens generation stops at, wherever a trained run is used: the end-of-turn the data trained, then the
tokenizer's eos.

A base model trained with a chat template learns to close each answer with the template's end-of-turn
(<|eot_id|>, <|im_end|>), which is not its tokenizer's eos (<|end_of_text|>, <|endoftext|>): stopping at eos
alone, chat and every server would run to the token limit. The run's stop tokens are computed once from the
prepared run (`stop_tokens`), recorded in summary.json, and written as Hugging Face writes them for a chat model
(generation_config.json, eos_token_id a list, as Llama-3.1-Instruct ships it) beside the adapter and the merged
model; `chat` and `export-gguf` read them from there. The tokenizer's own eos is left as it is: TRL appends it to
text rows, and resume, merge and chat reload the adapter's tokenizer."""

from __future__ import annotations

import copy
import os


def stop_tokens(tokenizer, end_of_turn: int | None) -> list[int]:
    """The run's stop tokens: the end-of-turn the data trained (qtune.data.preparation.end_of_turn_id), then the
    tokenizer's eos (what the base stopped at), each once; [eos] when the data trained eos itself (text rows)."""
    return list(dict.fromkeys(i for i in (end_of_turn, tokenizer.eos_token_id) if i is not None))


def with_stops(generation_config, stops: list[int], tokenizer):
    """A copy of `generation_config` (the base's; a fresh one for None) that stops at `stops`, followed by any
    stop token the base's own configuration already had (e.g. an instruct model's <|eom_id|>), and pads with
    the tokenizer's pad."""
    from transformers import GenerationConfig

    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    had = config.eos_token_id
    had = [] if had is None else [had] if isinstance(had, int) else list(had)
    config.eos_token_id = list(dict.fromkeys([*stops, *had]))
    pad = tokenizer.pad_token_id
    config.pad_token_id = pad if pad is not None else config.eos_token_id[0] if config.eos_token_id else None
    if config.bos_token_id is None and tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    # Not "derived from config.json" any more: older transformers replace such a configuration by the model
    # config's (eos alone) when it looks unmodified since loading.
    config._from_model_config = False
    return config


def saved_stops(folder: str | os.PathLike, tokenizer) -> list[int]:
    """The stop tokens saved in `folder` (an adapter or model folder's generation_config.json); for a folder
    without one (an adapter saved before qtune wrote it), those of its tokenizer: the chat template's
    end-of-turn (what a chat on it renders), then eos."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(folder)).eos_token_id
    except OSError:
        eos = None
    if eos is not None:
        return [eos] if isinstance(eos, int) else list(eos)
    from qtune.data.preparation import end_of_turn_id

    return stop_tokens(tokenizer, end_of_turn_id(tokenizer, "messages" if tokenizer.chat_template else "text"))


def describe(tokenizer, stops: list[int]) -> list[dict]:
    """[{"id": …, "token": …}] for summary.json."""
    return [{"id": i, "token": tokenizer.convert_ids_to_tokens(i)} for i in stops]
