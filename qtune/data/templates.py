"""Chat templates: the built-ins (each with {% generation %} markers around the answers), setting the recipe's
choice on the tokenizer (a built-in must render like the tokenizer's own), and rendering every chat once."""

from __future__ import annotations

import sys

from qtune.config import Recipe
from qtune.data.formats import Rows, is_conversational
from qtune.errors import QtuneError, first_line

# Each renders like the model family's own template and wraps every assistant answer, with its
# end-of-turn token, in {% generation %} so TRL's assistant_only_loss trains exactly those tokens.

_ALTERNATE = (
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
)
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama-3": (
        "{% for message in messages %}"
        "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "llama-2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}" + _ALTERNATE + "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{% generation %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endgeneration %}{% endif %}"
        "{% endfor %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] + '\\n\\n' %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}"
        "{{ bos_token }}{% for message in loop_messages %}" + _ALTERNATE + "{% if message['role'] == 'user' %}"
        "{% if loop.index0 == 0 %}{{ '[INST] ' + system_message + message['content'] + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% endif %}"
        "{% endfor %}"
    ),
    "zephyr": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}

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


def use_chat_template(recipe: Recipe, tokenizer) -> None:
    """Set the recipe's chat template on the tokenizer (it is saved with the adapter). A built-in name must
    render like the tokenizer's own template, if it has one: it only adds the {% generation %} markers."""
    choice = recipe.data.chat_template
    if choice is None or tokenizer.chat_template == TEMPLATES.get(choice, choice):
        return
    if choice in TEMPLATES:
        own = tokenizer.chat_template
        if own:
            for probe in _PROBES:
                try:
                    theirs = tokenizer.apply_chat_template(probe, tokenize=False)
                except Exception:
                    continue  # e.g. a template without system prompts
                ours = tokenizer.apply_chat_template(probe, tokenize=False, chat_template=TEMPLATES[choice])
                if ours != theirs:
                    raise QtuneError(
                        f"data.chat_template: '{choice}' renders differently from the tokenizer's saved "
                        f"chat_template: {theirs!r} vs {ours!r}",
                        "leave data.chat_template unset to use the tokenizer's own, pick the built-in that "
                        "matches the model, or give a Jinja string to change the format on purpose",
                    )
        tokenizer.chat_template = TEMPLATES[choice]
        return
    if "{%" not in choice and "{{" not in choice:
        raise QtuneError(
            f"data.chat_template: unknown template '{choice}'",
            f"use one of {', '.join(TEMPLATES)}, a Jinja template string, or null for the tokenizer's own",
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
            f"set data.chat_template to one of {', '.join(TEMPLATES)} (or a Jinja string), or use the text or "
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
            conversations = [row["prompt"] + row["completion"]]
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
