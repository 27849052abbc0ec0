"""Chat templates: the built-ins (each the released template of the model it is named after, byte for byte),
setting the recipe's choice on the tokenizer (a built-in must render like the tokenizer's own), and rendering
every chat once.

Built-ins carry no {% generation %} markers: released templates have none, and every assistant turn is trained
through qtune.data.turns, which derives each answer's mask from the template by rendering it incrementally."""

from __future__ import annotations

import sys

from qtune.config import Recipe
from qtune.data.formats import Rows, is_conversational
from qtune.errors import QtuneError, first_line

# The released templates no library ships, as their model repositories ship them (tests/test_builtin_templates.py
# checks each, byte for byte, against the copy llama.cpp's tests or llama-cpp-python's formats carry).

_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

_MISTRAL_V0_1 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)

_MISTRAL_V0_2 = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

_MISTRAL_V0_3 = (
    '{%- if messages[0]["role"] == "system" %}\n'
    '    {%- set system_message = messages[0]["content"] %}\n'
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n'
    "\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n"
    "{%- set ns = namespace() %}\n"
    "{%- set ns.index = 0 %}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}\n'
    '        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n'
    '            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "        {%- endif %}\n"
    "        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if message["role"] == "user" %}\n'
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    '            {{- "[AVAILABLE_TOOLS] [" }}\n'
    "            {%- for tool in tools %}\n"
    "                {%- set tool = tool.function %}\n"
    '                {{- \'{"type": "function", "function": {\' }}\n'
    '                {%- for key, val in tool.items() if key != "return" %}\n'
    "                    {%- if val is string %}\n"
    "                        {{- '\"' + key + '\": \"' + val + '\"' }}\n"
    "                    {%- else %}\n"
    "                        {{- '\"' + key + '\": ' + val|tojson }}\n"
    "                    {%- endif %}\n"
    "                    {%- if not loop.last %}\n"
    '                        {{- ", " }}\n'
    "                    {%- endif %}\n"
    "                {%- endfor %}\n"
    '                {{- "}}" }}\n'
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- else %}\n"
    '                    {{- "]" }}\n'
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    '            {{- "[/AVAILABLE_TOOLS]" }}\n'
    "            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    "        {%- else %}\n"
    '            {{- "[INST] " + message["content"] + "[/INST]" }}\n'
    "        {%- endif %}\n"
    "    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    '        {{- "[TOOL_CALLS] [" }}\n'
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- set out = tool_call.function|tojson %}\n"
    "            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
    '                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "            {%- endif %}\n"
    "            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    "            {%- if not loop.last %}\n"
    '                {{- ", " }}\n'
    "            {%- else %}\n"
    '                {{- "]" + eos_token }}\n'
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    '    {%- elif message["role"] == "assistant" %}\n'
    '        {{- " " + message["content"]|trim + eos_token}}\n'
    '    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n'
    "        {%- if message.content is defined and message.content.content is defined %}\n"
    "            {%- set content = message.content.content %}\n"
    "        {%- else %}\n"
    "            {%- set content = message.content %}\n"
    "        {%- endif %}\n"
    '        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n'
    "        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n"
    '            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "        {%- endif %}\n"
    "        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
    "    {%- else %}\n"
    '        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)


# name: (where the template is released, how qtune gets it: "trl:NAME" is the byte-identical copy TRL ships as
# trl.chat_template_utils.NAME, loaded when used; else the string above)
BUILTINS = {
    "llama-3": ("meta-llama/Meta-Llama-3-8B-Instruct", "trl:llama3_chat_template"),
    "llama-3.1": ("meta-llama/Llama-3.1-8B-Instruct", "trl:llama3_1_chat_template"),
    "llama-3.2": ("meta-llama/Llama-3.2-3B-Instruct", "trl:llama3_2_chat_template"),
    "qwen2.5": ("Qwen/Qwen2.5-7B-Instruct", "trl:qwen2_5_chat_template"),
    "phi-3": ("microsoft/Phi-3-mini-4k-instruct", "trl:phi3_chat_template"),
    "phi-3.5": ("microsoft/Phi-3.5-mini-instruct", "trl:phi3_5_chat_template"),
    "gemma": ("google/gemma-2-2b-it (Gemma 1 and 2 ship the same)", "trl:gemma_chat_template"),
    "mistral-v0.1": ("mistralai/Mistral-7B-Instruct-v0.1, as released", _MISTRAL_V0_1),
    "mistral-v0.2": (
        "mistralai/Mistral-7B-Instruct-v0.2 (Mistral's 'v1' template, with a system prompt)",
        _MISTRAL_V0_2,
    ),
    "mistral-v0.3": (
        "mistralai/Mistral-7B-Instruct-v0.3 (Mistral's 'v3' template, as Mistral-Large-2407)",
        _MISTRAL_V0_3,
    ),
    "chatml": ("teknium/OpenHermes-2.5-Mistral-7B", _CHATML),
}

# Names of earlier built-ins that matched no released template byte for byte.
RETIRED = {
    "mistral": "mistral-v0.1, mistral-v0.2 or mistral-v0.3 (the one the model was released with)",
    "llama-2": "the tokenizer's own template (Llama-2-chat ships one) or a Jinja string",
    "zephyr": "the tokenizer's own template (zephyr ships one) or a Jinja string",
}


def builtin_template(name: str) -> str:
    """The built-in's Jinja string (TRL's copy read when asked, so qtune holds no second copy of it)."""
    how = BUILTINS[name][1]
    if how.startswith("trl:"):
        from trl import chat_template_utils

        return getattr(chat_template_utils, how[4:])
    return how


# Conversations a template is rendered on to compare it with the tokenizer's own.
_PROBES = (
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "no"},
    ],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}],
)


def has_generation_markers(template: str | None) -> bool:
    """Whether the template marks answers with {% generation %} (what TRL's assistant_only_loss needs)."""
    import re

    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", template or ""))


def builtin_names() -> str:
    return ", ".join(BUILTINS)


def use_chat_template(recipe: Recipe, tokenizer) -> None:
    """Set the recipe's chat template on the tokenizer (it is saved with the adapter). A built-in name must
    render like the tokenizer's own template, if it has one (a built-in is a released template: choosing one
    names the model's own, or gives a base model the template of the release it is named after)."""
    choice = recipe.data.chat_template
    if choice is None:
        return
    if choice in RETIRED:
        raise QtuneError(
            f"data.chat_template: '{choice}' is no longer a built-in: it matched no released template byte for byte",
            f"use {RETIRED[choice]}; the built-ins are {builtin_names()}",
        )
    if choice in BUILTINS:
        template = builtin_template(choice)
        if tokenizer.chat_template == template:
            return
        own = tokenizer.chat_template
        if own:
            for probe in _PROBES:
                try:
                    theirs = tokenizer.apply_chat_template(probe, tokenize=False)
                except Exception:
                    continue  # e.g. a template without system prompts
                try:
                    ours = tokenizer.apply_chat_template(probe, tokenize=False, chat_template=template)
                except Exception as exc:
                    ours = f"(fails: {first_line(exc)})"
                if ours != theirs:
                    raise QtuneError(
                        f"data.chat_template: '{choice}' renders differently from the tokenizer's saved "
                        f"chat_template: {theirs!r} vs {ours!r}",
                        f"'{choice}' is the template of {BUILTINS[choice][0]}: leave data.chat_template unset to "
                        "use the tokenizer's own, pick the built-in that matches the model, or give a Jinja string "
                        "to change the format on purpose",
                    )
        tokenizer.chat_template = template
        return
    if tokenizer.chat_template == choice:
        return
    if "{%" not in choice and "{{" not in choice:
        raise QtuneError(
            f"data.chat_template: unknown template '{choice}'",
            f"use one of {builtin_names()}, a Jinja template string, or null for the tokenizer's own",
        )
    try:
        tokenizer.apply_chat_template(_PROBES[1], tokenize=False, chat_template=choice)
    except Exception as exc:
        raise QtuneError(f"data.chat_template: the Jinja template fails to render: {first_line(exc)}") from None
    tokenizer.chat_template = choice


def require_chat_template(recipe: Recipe, tokenizer, schema: str, rows: list[dict]) -> None:
    """Chats need a chat template: an error naming the tokenizer when it has none."""
    if is_conversational(schema, rows) and not tokenizer.chat_template:
        raise QtuneError(
            f"model.tokenizer: {recipe.model.tokenizer or recipe.model.name} has no chat template for the "
            f"{schema} rows",
            f"set data.chat_template to one of {builtin_names()} (or a Jinja string), or use the text or "
            "plain prompt/completion format",
        )


class ToolsNotRendered(Exception):
    """The template renders a tool-call row without its calls or its function schemas."""


def _check_tools_rendered(conversation: list[dict], tools: list | None, rendered: str) -> None:
    names = [c["function"]["name"] for m in conversation for c in m.get("tool_calls") or []]
    names += [t.get("function", t).get("name", "") for t in tools or []]
    missing = sorted({n for n in names if n and n not in rendered})
    if missing:
        raise ToolsNotRendered(
            f"the chat template has no tool support: the tool calls or schemas ({', '.join(missing)}) are not rendered"
        )


def check_chats_render(rows: Rows, tokenizer, on_bad_row: str) -> None:
    """Render every chat once (text only): a row the template refuses (e.g. role order) is an error naming
    it, or skipped and counted. Rows are filtered in place."""
    from qtune.data.turns import clean_message, tools_of

    keep, labels, failed = [], [], 0
    first = None
    for i, row in enumerate(rows):
        if "messages" in row:
            conversations = [row["messages"]]
        elif "chosen" in row:  # a preference pair: both conversations
            conversations = [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
        else:
            conversations = [row["prompt"] + row.get("completion", [])]  # prompt_only (grpo, rloo): the prompt
        tools = tools_of(row)
        try:
            for conversation in conversations:
                conversation = [clean_message(m) for m in conversation]
                rendered = tokenizer.apply_chat_template(
                    conversation, tokenize=False, **({"tools": tools} if tools else {})
                )
                _check_tools_rendered(conversation, tools, rendered)
        except Exception as exc:
            where = rows.where[i] if i < len(rows.where) else f"row {i + 1}"
            if on_bad_row == "error":
                raise QtuneError(
                    f"{where}: the chat template fails to render it: {first_line(exc)}",
                    "fix the row, choose a template for these roles, or set data.on_bad_row: skip",
                ) from None
            failed += 1
            first = first or f"{where}: {first_line(exc)}"
            continue
        keep.append(row)
        labels.append(rows.where[i] if i < len(rows.where) else "")
    if failed:
        rows[:] = keep
        rows.where = labels
        rows.notes.append(f"skipped {failed} row(s) the chat template refused; first: {first}")
        print(f"qtune: warning: skipped {failed} row(s) the chat template refused; first: {first}", file=sys.stderr)
        if not keep:
            raise QtuneError("data: the chat template refused every row", first)
