"""The formats a source may be in (alpaca, sharegpt, messages, prompt_completion, text, + a per-source column
mapping), each row checked and mapped to one internal schema, as TRL names it:

  messages           {"messages": [{"role": ..., "content": ...}, ...]}   (alpaca, sharegpt too)
  prompt_completion  {"prompt": str | messages, "completion": str | messages}
  text               {"text": str}
  preference         {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}   (dpo, orpo,
                     simpo, kto, reward; also ShareGPT's form: conversations + chosen/rejected {from, value})
  unpaired           {"prompt": str | messages, "completion": str | messages, "label": bool}   (kto)
  prompt_only        {"prompt": str | messages, **other columns (passed to the reward functions)}   (grpo, rloo)

Pure functions on rows: no files, no tokenizer."""

from __future__ import annotations

from qtune.errors import QtuneError

FORMAT_SCHEMA = {
    "alpaca": "messages",
    "sharegpt": "messages",
    "messages": "messages",
    "prompt_completion": "prompt_completion",
    "text": "text",
    "preference": "preference",
    "unpaired": "unpaired",
    "prompt": "prompt_only",
}
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system"),
    "sharegpt": ("conversations", "tools", "system"),
    "messages": ("messages", "tools"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt": ("prompt",),  # or messages ending with a user turn; every other column goes to the reward functions
}
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
    "function_call": "assistant",  # a tool call: its value is the call's JSON ({name, arguments}, or a list)
}
MULTIMODAL_COLUMNS = ("images", "image", "videos", "video", "audios", "audio")
MULTIMODAL_PLACEHOLDERS = ("<image>", "<video>", "<audio>")


class BadRow(Exception):
    """One row that cannot be used; the message says why (the caller adds file and row)."""


class Rows(list):
    """The training rows in one schema (a list of dicts), plus what loading found out about them."""

    def __init__(self, rows=(), schema: str = "", eval_rows: list[dict] | None = None):
        super().__init__(rows)
        self.schema = schema
        self.eval_rows = eval_rows
        self.where: list[str] = []  # "file: row N" for each row, for errors found later (template render)
        self.sources: list[dict] = []  # per source: path, format, detected, rows read, rows kept, skipped
        self.notes: list[str] = []


def detect_format(columns: list[str], first_row: dict | None, where: str) -> str:
    """The format the columns (after the source's mapping) fit, or an error listing them."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:  # before messages: UltraFeedback-binarized ships a messages column too
        return "preference"
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        turns = (first_row or {}).get("conversations") or []
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        return "messages" if "role" in first and "from" not in first else "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion", "label"} <= cols and isinstance((first_row or {}).get("label"), bool):
        return "unpaired"  # KTO's: a completion labelled good or bad (another label column stays prompt_completion)
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "prompt" in cols:
        return "prompt"  # a prompt alone (grpo, rloo): the model writes the completions
    if "text" in cols:
        return "text"
    raise QtuneError(
        f"{where}: cannot tell the format from the columns {sorted(columns)}",
        "rows need 'messages', 'conversations' (sharegpt), 'instruction' + 'output' (alpaca), 'prompt' + "
        "'completion', 'text', 'chosen' + 'rejected' (preference), or 'prompt' + 'completion' + 'label' (unpaired); "
        "or set the source's format: and map names with columns: {field: column}",
    )


def _text(value, key: str, required: bool = True) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BadRow(f"missing, null or empty '{key}'")
        return ""
    if not isinstance(value, str):
        raise BadRow(f"'{key}' must be text, got {type(value).__name__}")
    return value


def _multimodal(why: str) -> BadRow:
    return BadRow(f"multimodal row ({why}): qtune trains text only; drop the row or its media")


def _content_text(content, where: str) -> str:
    """Text content; a list of content parts that are all text is joined; media parts are refused."""
    if isinstance(content, list):
        kinds = {part.get("type") if isinstance(part, dict) else type(part).__name__ for part in content}
        if kinds - {"text"}:
            raise _multimodal(f"{where} has {', '.join(sorted(str(k) for k in kinds - {'text'}))} content parts")
        content = "".join(part.get("text") or "" for part in content)
    if isinstance(content, str):
        for placeholder in MULTIMODAL_PLACEHOLDERS:
            if placeholder in content:
                raise _multimodal(f"{where} has an {placeholder} placeholder")
    return content


def _tool_calls(value, where: str) -> str:
    """Tool calls as the OpenAI/HF form [{type: function, function: {name, arguments: {...}}}], stored as JSON
    text (arguments differ in shape from call to call; Arrow needs one schema)."""
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRow(f"{where}: tool call is not valid JSON") from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRow(f"{where}: a tool call needs a function name")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise BadRow(f"{where}: tool call arguments are not valid JSON") from None
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
        if isinstance(call, dict) and call.get("id"):
            entry["id"] = call["id"]
        out.append(entry)
    return json.dumps(out, ensure_ascii=False)


def tools_column(value) -> str | None:
    """A row's `tools` (function schemas, bare or {type: function, function: ...}) as JSON text, or None."""
    import json

    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRow("'tools' is not valid JSON") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRow("'tools' must be a list of function schemas")
    wrapped = [
        t if t.get("type") == "function" and "function" in t else {"type": "function", "function": t} for t in value
    ]
    return json.dumps(wrapped, ensure_ascii=False) if wrapped else None


def _check_messages(value, key: str, need_assistant: bool) -> list[dict]:
    """A clean copy of a role/content message list (tool calls and tool results kept), or BadRow."""
    if not isinstance(value, list) or not value:
        raise BadRow(f"'{key}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, message in enumerate(value):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not isinstance(message, dict) or message.get("role") is None or ("content" not in message and not calls):
            raise BadRow(f"{key}[{i}] needs 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise BadRow(f"{key}[{i}].role '{role}' is not one of {sorted(ROLES)}")
        content = _content_text(message.get("content"), f"{key}[{i}]")
        if calls and role == "assistant":
            entry = {"role": role, "content": content or "", "tool_calls": _tool_calls(calls, f"{key}[{i}]")}
            out.append(entry)
            continue
        if content is None or not isinstance(content, str):
            raise BadRow(f"{key}[{i}].content must be text, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise BadRow(f"{key}[{i}] is an empty assistant answer")
        entry = {"role": role, "content": content}
        if role == "tool":
            entry.update({k: message[k] for k in ("name", "tool_call_id") if isinstance(message.get(k), str)})
        out.append(entry)
    if need_assistant:
        _check_order(out, key)
    return out


def _check_order(messages: list[dict], key: str) -> None:
    """system (first only), then user and assistant alternating (tool results between), an answer in it."""
    previous = None
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i != 0:
            raise BadRow(f"wrong role order: {key}[{i}] is a system message after the start")
        if role == "assistant" and previous not in ("user", "tool"):
            raise BadRow(f"wrong role order: {key}[{i}] (assistant) follows {previous or 'nothing'}, not user")
        if role == "user" and previous == "user":
            raise BadRow(f"wrong role order: {key}[{i}] is a second user message in a row")
        if role == "tool" and previous not in ("assistant", "tool"):
            raise BadRow(f"wrong role order: {key}[{i}] (tool) does not follow an assistant call")
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(f"'{key}' has no assistant message to learn from")


def map_row(row: dict, fmt: str, roles: dict[str, str]) -> dict:
    """One row of `fmt` mapped to its schema's columns, or BadRow."""
    for column in MULTIMODAL_COLUMNS:
        if row.get(column) not in (None, [], ""):
            raise _multimodal(f"an '{column}' column")
    if fmt == "messages":
        key = "messages" if "messages" in row else "conversations"
        return _with_tools({"messages": _check_messages(row.get(key), key, need_assistant=True)}, row)
    if fmt == "alpaca":
        instruction = _text(row.get("instruction"), "instruction")
        extra = _text(row.get("input"), "input", required=False)
        output = _text(row.get("output"), "output")
        system = _text(row.get("system"), "system", required=False)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages = [{"role": "system", "content": system}] if system.strip() else []
        return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": output}]}
    if fmt == "sharegpt":
        messages = _sharegpt_turns(row.get("conversations"), "conversations", roles)
        system = row.get("system")
        if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return _with_tools({"messages": _check_messages(messages, "conversations", need_assistant=True)}, row)
    if fmt == "text":
        return {"text": _text(row.get("text"), "text")}
    if fmt == "preference":
        return _preference(_sharegpt_pair(row, roles) if "conversations" in row else row)
    if fmt == "unpaired":
        return _unpaired(row)
    if fmt == "prompt":
        return _prompt_only(row)
    return _prompt_completion(row)


def _sharegpt_turns(turns, key: str, roles: dict[str, str]) -> list[dict]:
    """ShareGPT {from, value} turns (one turn alone: a list of it) as messages, speakers mapped by `roles`."""
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"'{key}' must be a non-empty list of {{from, value}} turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") is None or "value" not in turn:
            raise BadRow(f"{key}[{i}] needs 'from' and 'value'")
        if turn["from"] not in roles:
            raise BadRow(
                f"{key}[{i}].from '{turn['from']}' is not a known speaker "
                f"(known: {', '.join(sorted(roles))}; add it with the source's roles: {{name: role}})"
            )
        if turn["from"] == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": turn["value"]})
        else:
            messages.append({"role": roles[turn["from"]], "content": turn["value"]})
    return messages


def _sharegpt_pair(row: dict, roles: dict[str, str]) -> dict:
    """The ShareGPT preference form (LLaMA-Factory's): `conversations` (the prompt turns) with `chosen` and
    `rejected` as {from, value} answers (or lists of them), and an optional `system`: mapped to message lists."""
    prompt = _sharegpt_turns(row.get("conversations"), "conversations", roles)
    system = row.get("system")
    if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    pair = {"prompt": prompt}
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if value in (None, "", []):
            raise BadRow(f"missing '{key}'")
        pair[key] = _sharegpt_turns(value, key, roles)
    return pair


def _prompt_only(row: dict) -> dict:
    """A prompt for grpo / rloo: `prompt` as text or messages, or a `messages` list, either ending with a user turn
    (the model answers it); every other column kept as it is, for the reward functions (e.g. `answer`)."""
    key = "prompt" if "prompt" in row else "messages"
    prompt = row.get(key)
    if isinstance(prompt, list):
        messages = _check_messages(prompt, key, need_assistant=False)
        if messages[-1]["role"] != "user":
            raise BadRow(
                f"'{key}' ends with a {messages[-1]['role']} message: the prompt must end with the user turn the "
                "model answers (drop the answer; put a reference answer in its own column, e.g. 'answer')"
            )
        _check_order([*messages, {"role": "assistant", "content": "."}], key)
        prompt = messages
    else:
        prompt = _text(prompt, key)
    extra = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    if "completion" in extra or "completions" in extra:
        raise BadRow("a 'completion' column: grpo / rloo generate the completions; rename it (e.g. 'answer')")
    return {"prompt": prompt, **extra}


def with_system_prompt(prompt, system: str):
    """grpo / rloo's system_prompt put first in a prompt: text becomes [system, user]; a chat gets the system message
    unless it starts with one (the data's own wins)."""
    if isinstance(prompt, str):
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    if prompt and prompt[0].get("role") == "system":
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def _prompt_completion(row: dict) -> dict:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise BadRow("'prompt' and 'completion' must both be text or both be message lists")
        p = _check_messages(prompt, "prompt", need_assistant=False)
        c = _check_messages(completion, "completion", need_assistant=False)
        _check_order(p + c, "prompt + completion")
        if not any(m["role"] == "assistant" for m in c):
            raise BadRow("'completion' has no assistant message to learn from")
        return {"prompt": p, "completion": c}
    return {"prompt": _text(prompt, "prompt"), "completion": _text(completion, "completion")}


def _preference(row: dict) -> dict:
    """A preference pair: prompt + chosen + rejected, all text or all message lists. Without a prompt (or with
    chosen and rejected as whole conversations, as UltraFeedback-binarized ships them) the prompt is the prefix
    they share, split off by TRL's own extract_prompt."""
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        raise BadRow(f"missing '{'chosen' if chosen is None else 'rejected'}'")
    system = row.get("system")
    if isinstance(system, str) and system.strip() and all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        # a text pair with a system prompt (Intel/orca_dpo_pairs: system, question, chosen, rejected): as messages,
        # so the chat template places the system prompt where the model expects it instead of dropping it
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise BadRow("'chosen' and 'rejected' must both be text or both be message lists")
    if chosen == rejected:
        raise BadRow("'chosen' and 'rejected' are identical: the pair prefers nothing")
    if isinstance(chosen, list):
        c = _check_messages(chosen, "chosen", need_assistant=False)
        r = _check_messages(rejected, "rejected", need_assistant=False)
        if isinstance(prompt, list):
            p = _check_messages(prompt, "prompt", need_assistant=False)
        else:  # whole conversations: the shared prefix is the prompt
            from trl.data_utils import extract_prompt

            split = extract_prompt({"chosen": c, "rejected": r})
            p, c, r = split["prompt"], split["chosen"], split["rejected"]
            if not p:
                raise BadRow("'chosen' and 'rejected' share no prompt (their first messages differ) and there is no "
                             "'prompt' message list")  # fmt: skip
            if isinstance(prompt, str) and prompt.strip():
                asked = next((m["content"] for m in reversed(p) if m["role"] == "user"), None)
                if asked is None or asked.strip() != prompt.strip():
                    raise BadRow("'prompt' differs from the last user message 'chosen' and 'rejected' share")
        for key, completion in (("chosen", c), ("rejected", r)):
            if not completion or completion[0]["role"] != "assistant":
                raise BadRow(f"'{key}' must start with the assistant's answer to the prompt")
            _check_order(p + completion, f"prompt + {key}")
        if c == r:
            raise BadRow("'chosen' and 'rejected' are identical: the pair prefers nothing")
        return {"prompt": p, "chosen": c, "rejected": r}
    if isinstance(prompt, list):
        raise BadRow("'prompt' is a message list but 'chosen' and 'rejected' are text: give all three one way")
    chosen, rejected = _text(chosen, "chosen"), _text(rejected, "rejected")
    if prompt is None:
        from trl.data_utils import extract_prompt

        split = extract_prompt({"chosen": chosen, "rejected": rejected})
        if not split["prompt"].strip():
            raise BadRow("no 'prompt', and 'chosen' and 'rejected' share no prefix to take as the prompt")
        return split
    return {"prompt": _text(prompt, "prompt"), "chosen": chosen, "rejected": rejected}


def _unpaired(row: dict) -> dict:
    """KTO's unpaired preference: a prompt + completion pair (text or message lists, as prompt_completion) and a
    boolean label: true, the completion is desirable; false, undesirable."""
    label = row.get("label")
    if not isinstance(label, bool):
        shown = repr(label) if label is None or isinstance(label, (str, int, float)) else type(label).__name__
        raise BadRow(f"'label' must be true (desirable) or false (undesirable), got {shown}")
    return {**_prompt_completion(row), "label": label}


def unpair(rows: list[dict], where: list[str]) -> tuple[list[dict], list[str]]:
    """Preference pairs as KTO's unpaired rows: the chosen completion labelled true, the rejected one false (what
    TRL's unpair_preference_dataset makes), with their "file: row N" labels."""
    out, labels = [], []
    for i, row in enumerate(rows):
        for key, label in (("chosen", True), ("rejected", False)):
            out.append({"prompt": row["prompt"], "completion": row[key], "label": label})
            labels.append(f"{where[i]} ({key})" if i < len(where) else f"row {i + 1} ({key})")
    return out, labels


def _with_tools(mapped: dict, row: dict) -> dict:
    """The row's tools column, when there is one (a row without keeps the schema of rows without tools)."""
    tools = tools_column(row.get("tools"))
    has_calls = any(m.get("tool_calls") for m in mapped["messages"])
    if has_calls and not tools:
        raise BadRow("tool calls without a 'tools' column: the prompt would not show the functions they call")
    return {**mapped, "tools": tools} if tools else mapped


def rename_columns(row: dict, columns: dict[str, str] | None) -> dict:
    """The row with the source's columns: {field: column} mapping applied (column names become field names)."""
    if not columns:
        return row
    inverse = {column: name for name, column in columns.items()}
    return {inverse.get(k, k): v for k, v in row.items()}


def is_conversational(schema: str, rows: list[dict]) -> bool:
    """Whether the rows are chats (messages, or prompt/completion message lists) that need a chat template."""
    return schema == "messages" or (
        schema in ("prompt_completion", "preference", "unpaired", "prompt_only") and isinstance(rows[0]["prompt"], list)
    )
