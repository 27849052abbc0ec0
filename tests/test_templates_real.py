"""Per-turn masking on the released chat templates and tokenizers of the model families (tests/corpus.py builds
the corpus once from the llama-cpp-python sdist and TRL's templates): token by token, every answer with its
per-turn end trained, nothing else; system prompts, tool calls, and templates that move or drop content."""

from __future__ import annotations

import json

import pytest

from conftest import trained_spans
from qtune.data.formats import BadRow, map_row
from qtune.data.turns import end_of_turn_id, tokenize_turns

FAMILIES = {  # family: (per-turn end, renders tool calls)
    "llama-3.1": ("<|eot_id|>", True),
    "llama-3.2": ("<|eot_id|>", True),
    "qwen2.5": ("<|im_end|>", True),
    "phi-3": ("<|end|>", False),
    "phi-3.5": ("<|end|>", False),
    "mistral-nemo": ("</s>", True),
}


@pytest.fixture(scope="session")
def corpus():
    import corpus as builder

    try:
        return builder.build()
    except Exception as exc:  # no sdist copy and no way to download it
        pytest.skip(f"real-template corpus unavailable (pip download {builder.SDIST} failed: {exc})")


@pytest.fixture(scope="session")
def family_tokenizer(corpus):
    from corpus import FAMILIES as SOURCES
    from transformers import AutoTokenizer

    cache = {}

    def load(family):
        if family not in cache:
            tok = AutoTokenizer.from_pretrained(str(corpus / "tokenizers" / SOURCES[family][0]))
            tok.chat_template = (corpus / "templates" / f"{family}.jinja").read_text(encoding="utf-8")
            cache[family] = tok
        return cache[family]

    return load


SINGLE = [{"role": "user", "content": "Spell 1"}, {"role": "assistant", "content": "one"}]
MULTI = [
    *SINGLE,
    {"role": "user", "content": "Spell 2"},
    {"role": "assistant", "content": "two"},
    {"role": "user", "content": "Spell 3"},
    {"role": "assistant", "content": "three"},
]
SYSTEM = [{"role": "system", "content": "Answer in words."}, *MULTI]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "spell_number",
            "description": "Spell a number in words",
            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        },
    }
]
CALL = {"type": "function", "function": {"name": "spell_number", "arguments": {"n": 4}}}
TOOL_CHAT = [
    {"role": "user", "content": "Spell 4"},
    {"role": "assistant", "content": "", "tool_calls": [{**CALL, "id": "call12345"}]},  # Mistral: 9 alnum
    {"role": "tool", "name": "spell_number", "tool_call_id": "call12345", "content": "four-result"},
    {"role": "assistant", "content": "four"},
]


def _spans(tokenizer, ids, mask) -> list[str]:
    return trained_spans(tokenizer, ids, mask)


def _own_ids(tokenizer, messages, tools=None) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **({"tools": tools} if tools else {}))
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("chat", ["single turn", "multi-turn", "system prompt"])
def test_every_answer_and_its_turn_end_train_token_by_token(family_tokenizer, family, chat):
    tok = family_tokenizer(family)
    eot = FAMILIES[family][0]
    messages = {"single turn": SINGLE, "multi-turn": MULTI, "system prompt": SYSTEM}[chat]
    out = tokenize_turns(tok, messages)
    assert out["input_ids"] == _own_ids(tok, messages)  # the template's own rendering, token for token
    spans = _spans(tok, out["input_ids"], out["assistant_masks"])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if family == "mistral-nemo" and chat == "system prompt":
        # the system prompt goes into the last user turn only while generating: no answer's training context
        # matches its inference context, and the training text has no system prompt at all: counted, not trained
        assert spans == [] and out["qtune_moved"] == 3 and out["qtune_dropped"] == 1
        return
    assert spans == [f"{a}{eot}" for a in answers], spans
    assert out["qtune_trained"] == out["qtune_answers"] == len(answers) and not out["qtune_dropped"]
    # the per-turn end is what the end-of-turn check watches (Phi-3.5: <|end|>, not <|endoftext|>)
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == eot
    last = tokenize_turns(tok, messages, train_on="last")
    assert _spans(tok, last["input_ids"], last["assistant_masks"]) == spans[-1:]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tool_calls_train_the_call_not_the_result_or_are_refused(family_tokenizer, family):
    from qtune.data.templates import ToolsNotRendered, _check_tools_rendered

    tok = family_tokenizer(family)
    eot, renders_tools = FAMILIES[family]
    rendered = tok.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False)
    if not renders_tools:
        with pytest.raises(ToolsNotRendered, match="no tool support"):
            _check_tools_rendered(TOOL_CHAT, TOOLS, rendered)
        return
    _check_tools_rendered(TOOL_CHAT, TOOLS, rendered)
    out = tokenize_turns(tok, TOOL_CHAT, TOOLS)
    assert out["input_ids"] == _own_ids(tok, TOOL_CHAT, TOOLS)
    spans = _spans(tok, out["input_ids"], out["assistant_masks"])
    if family == "mistral-nemo":
        # on the stand-in vocabulary [TOOL_CALLS] is text, and "[/INST][" tokenizes across the turn boundary:
        # the call's inference prompt is not a token prefix of the training text, so the call is counted, not
        # trained (Mistral's own vocabulary has [TOOL_CALLS] as one control token)
        assert spans == ["four</s>"] and out["qtune_moved"] == 1
        return
    assert len(spans) == 2 and out["qtune_trained"] == 2, spans
    assert "spell_number" in spans[0] and spans[0].endswith(eot) and "four-result" not in "".join(spans)
    assert spans[1].endswith(eot) and "four" in spans[1]


def test_sharegpt_and_openai_tool_rows_map_to_the_template_form():
    tools = json.dumps([TOOLS[0]["function"]])  # bare schemas, as ShareGPT data sets carry them
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Spell 4"},
            {"from": "function_call", "value": json.dumps({"name": "spell_number", "arguments": {"n": 4}})},
            {"from": "observation", "value": "four-result"},
            {"from": "gpt", "value": "four"},
        ],
        "tools": tools,
    }
    from qtune.data.formats import SHAREGPT_ROLES

    mapped = map_row(sharegpt, "sharegpt", SHAREGPT_ROLES)
    assert json.loads(mapped["tools"]) == TOOLS
    assert json.loads(mapped["messages"][1]["tool_calls"]) == [CALL] and mapped["messages"][2]["role"] == "tool"
    openai = {
        "messages": [
            TOOL_CHAT[0],
            {"role": "assistant", "content": None, "tool_calls": [{**CALL, "id": "c1"}]},
            {"role": "tool", "tool_call_id": "c1", "content": "four-result"},
            TOOL_CHAT[3],
        ],
        "tools": TOOLS,
    }
    mapped = map_row(openai, "messages", {})
    assert json.loads(mapped["messages"][1]["tool_calls"])[0]["function"] == CALL["function"]
    with pytest.raises(BadRow, match="without a 'tools' column"):
        map_row({"messages": openai["messages"]}, "messages", {})


@pytest.mark.parametrize(
    "row, why",
    [
        ({"messages": SINGLE, "images": ["a.png"]}, "an 'images' column"),
        ({"messages": [{"role": "user", "content": "<image>\nWhat is it?"}, SINGLE[1]]}, "<image> placeholder"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}, SINGLE[1]]},
            "image content parts",
        ),
    ],
)
def test_multimodal_rows_are_refused_in_one_line(row, why):
    with pytest.raises(BadRow, match=f"multimodal row .*{why}.*qtune trains text only"):
        map_row(row, "messages", {})


def test_text_content_parts_are_accepted():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Spell 1"}]}, SINGLE[1]]}
    assert map_row(row, "messages", {})["messages"] == SINGLE


def test_qtune_data_reports_answers_per_row_class_and_train_refuses_moved_system_prompts(corpus, tmp_path):
    """Through `qtune data` (TRL's own preparation, a real tokenizer): every answer of every chat trains on
    Qwen2.5's release template; on Mistral's, the system-prompt rows are said and refused."""
    import yaml

    from conftest import run_qtune, write_jsonl

    rows = [{"messages": MULTI}, {"messages": SYSTEM}, {"messages": SINGLE}]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    from corpus import FAMILIES as SOURCES

    for family, expect in (
        ("qwen2.5", ["multi-turn: 1 rows, 3 of 3 answers trained", "system prompt: 1 rows, 3 of 3 answers trained"]),
        ("mistral-nemo", ["system prompt: 1 rows, 0 of 3 answers trained, 3 with moved context"]),
    ):
        doc = {
            "model": {"name": str(corpus / "tokenizers" / SOURCES[family][0])},
            "quantization": {"bits": None},
            "data": {
                "datasets": [{"path": str(data)}],
                "max_length": 512,
                "chat_template": (corpus / "templates" / f"{family}.jinja").read_text(encoding="utf-8"),
            },
            "output_dir": str(tmp_path / "run"),
        }
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
        result = run_qtune("data", tmp_path / "r.yaml", "-n", "0", env={"HF_DATASETS_CACHE": str(tmp_path / "hf")})
        for line in expect:
            assert line in result.stdout, result.stdout
        if family == "qwen2.5":
            assert result.returncode == 0, result.stderr
        else:
            # Mistral renders the system prompt only while generating (into the last user turn): dropped from the
            # training text, and every answer's context moved; refused above data.max_untrained_share
            assert result.returncode == 2 and "error: data: system prompt: 1 of 1 rows lose a system" in result.stderr
