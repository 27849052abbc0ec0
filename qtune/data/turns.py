"""Per-turn loss masks derived from the chat template itself, for templates without {% generation %} markers
(every released one): each assistant turn is located by rendering the conversation incrementally, and proven
token by token against the template's own rendering of the whole conversation.

For the assistant turn k of a conversation whose full rendering is T:

  prompt_k = render(messages[:k], add_generation_prompt=True)    what the model sees at inference
  T        = render(messages)                                     what trains

The turn trains only when prompt_k is a prefix of T, and its tokenization is exactly the first tokens of T's (so the
training context equals the inference context, token for token). Its trained tokens run from there through the
first special token after the answer text: the template's per-turn end (<|eot_id|>, <|im_end|>, <|end|>, </s>),
not what the template writes once per conversation after it (Phi-3's <|endoftext|>) nor the newline between turns.
A turn whose prompt is not a prefix of T (the template moves content, e.g. Mistral's system prompt into the last
user turn) trains no token and is counted, as is content the template drops (a system prompt without a branch)."""

from __future__ import annotations

import json

# What a conversation is counted as, for the per-class report (first match wins).
ROW_CLASSES = ("tool calls", "system prompt", "multi-turn", "single turn")


def row_class(messages: list[dict]) -> str:
    if any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return "tool calls"
    if messages and messages[0]["role"] == "system":
        return "system prompt"
    return "multi-turn" if sum(m["role"] == "assistant" for m in messages) > 1 else "single turn"


def tools_of(row: dict) -> list | None:
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else None
    return tools or None


def _render(tokenizer, messages: list[dict], tools, generation_prompt: bool) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return ids


def tokenize_turns(tokenizer, messages: list[dict], tools=None, train_on: str = "completions") -> dict:
    """input_ids (the template's own rendering, tokenized as apply_chat_template does) and assistant_masks (1 on
    every trained answer with its end-of-turn), plus the per-turn counts: answers, trained, moved, dropped."""
    full = _render(tokenizer, messages, tools, generation_prompt=False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    special = _special_ids(tokenizer)
    answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    chosen = answers[-1:] if train_on == "last" else answers
    moved = 0
    for k in chosen:
        prompt = _render(tokenizer, messages[:k], tools, generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if full.startswith(prompt) else None
        if prompt_ids is None or ids[: len(prompt_ids)] != prompt_ids:
            moved += 1  # the inference prompt is not what precedes this answer in the training text
            continue
        start = len(prompt_ids)
        content = (messages[k].get("content") or "").strip()
        at = full.find(content, len(prompt)) if content else len(prompt)
        content_end = at + len(content) if at >= 0 else len(prompt)
        end = start
        while end < len(ids) and (offsets[end][1] <= content_end or ids[end] not in special):
            end += 1
        if end < len(ids):
            end += 1  # the end-of-turn token itself
        else:  # no special token closes the turn: train through the answer text (whitespace after it is not)
            end = start
            while end < len(ids) and offsets[end][0] < len(full.rstrip()):
                end += 1
        for i in range(start, end):
            mask[i] = 1
    dropped = sum(
        1
        for m in messages
        if m["role"] in ("system", "user") and (m.get("content") or "").strip() and m["content"].strip() not in full
    )
    return {
        "input_ids": ids,
        "assistant_masks": mask,
        "qtune_answers": len(answers),
        "qtune_trained": len(chosen) - moved,
        "qtune_moved": moved,
        "qtune_dropped": dropped,
        "qtune_class": row_class(messages),
    }


STAT_COLUMNS = ["qtune_answers", "qtune_trained", "qtune_moved", "qtune_dropped", "qtune_class"]


def tokenize_row(row: dict, tokenizer, train_on: str) -> dict:
    """datasets.map function: one messages (or prompt + completion messages) row tokenized with its masks."""
    messages = (
        row["messages"] if "messages" in row and row["messages"] is not None else row["prompt"] + row["completion"]
    )
    messages = [clean_message(m) for m in messages]
    return tokenize_turns(tokenizer, messages, tools_of(row), train_on)


def clean_message(message: dict) -> dict:
    """Arrow gives every message every key (None where absent): templates test `is defined`, so drop them."""
    out = {k: v for k, v in message.items() if v is not None}
    if isinstance(out.get("tool_calls"), str):
        out["tool_calls"] = json.loads(out["tool_calls"])
    return out


def turn_report(dataset) -> dict:
    """Per row class: rows, answers present, answers trained, turns whose context moved, rows with dropped content."""
    out: dict[str, dict] = {}
    columns = [dataset[c] for c in STAT_COLUMNS]
    for answers, trained, moved, dropped, cls in zip(*columns, strict=True):
        c = out.setdefault(cls, {"rows": 0, "answers": 0, "trained": 0, "moved": 0, "moved_rows": 0, "dropped_rows": 0})
        c["rows"] += 1
        c["answers"] += answers
        c["trained"] += trained
        c["moved"] += moved
        c["moved_rows"] += 1 if moved else 0
        c["dropped_rows"] += 1 if dropped else 0
    return {cls: out[cls] for cls in ROW_CLASSES if cls in out}


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes an assistant turn in the tokenizer's template: the last trained token of the first
    answer of a two-answer probe (for Phi-3.5: <|end|>, not the <|endoftext|> written once per conversation)."""
    probe = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "qtunemarker"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "qtunemarker"},
    ]
    try:
        out = tokenize_turns(tokenizer, probe)
    except Exception:
        return None
    mask, ids = out["assistant_masks"], out["input_ids"]
    first_end = next((i for i in range(1, len(mask)) if mask[i - 1] and not mask[i]), None)
    if first_end is None or ids[first_end - 1] not in _special_ids(tokenizer):
        return None
    return ids[first_end - 1]
