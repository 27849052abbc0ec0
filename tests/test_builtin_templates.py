"""The built-in chat templates are the released templates they are named after, byte for byte: each is compared
with a copy nobody here wrote (TRL's own, the release files llama.cpp vendors, the original Jinja strings in
llama.cpp's tests/test-chat-template.cpp and llama-cpp-python's formats: tests/corpus.py extracts them), renders
identically to it on a set of conversations, and trains every answer through qtune.data.turns on the families
whose vocabularies load."""

from __future__ import annotations

import pytest

from conftest import trained_spans
from qtune.data.templates import BUILTINS, builtin_template
from qtune.data.turns import tokenize_turns

CPP = "test-chat-template.cpp"
PY = "llama_chat_format.py"
# built-in: where its reference is ("file:<corpus template file>", "cpp:<test case name>", "py:<constant>")
REFERENCES = {
    "llama-3": ["py:LLAMA3_INSTRUCT_CHAT_TEMPLATE"],
    "llama-3.1": ["file:meta-llama-Llama-3.1-8B-Instruct.jinja"],
    "llama-3.2": ["file:meta-llama-Llama-3.2-3B-Instruct.jinja"],
    "qwen2.5": ["file:Qwen-Qwen2.5-7B-Instruct.jinja"],
    "phi-3.5": ["file:microsoft-Phi-3.5-mini-instruct.jinja"],
    "gemma": ["file:google-gemma-2-2b-it.jinja"],
    "mistral-v0.1": ["py:MISTRAL_INSTRUCT_CHAT_TEMPLATE"],
    "mistral-v0.2": ["cpp:mistralai/Mistral-7B-Instruct-v0.2 (mistralai 'v1' template with a system prompt)"],
    "mistral-v0.3": [
        "cpp:Mistral-Large-Instruct-2407 (mistralai 'v3' template; modified to have system prompt at start)"
    ],
    "chatml": ["py:CHATML_CHAT_TEMPLATE", "cpp:teknium/OpenHermes-2.5-Mistral-7B"],
}
# The two copies of OpenHermes' template differ in one byte class: llama.cpp's C++ test writes its newlines as the
# Jinja escape "\\n", llama-cpp-python (like TRL's files) as the newline itself, as tokenizer_config.json decodes;
# both render the same, so the C++ copy is compared by rendering only.
RENDER_ONLY = {("chatml", "cpp:teknium/OpenHermes-2.5-Mistral-7B")}
# phi-3 has no copy in the sdist: it is TRL's phi3.jinja itself, byte for byte (checked below)
UNREFERENCED = {"phi-3"}


@pytest.fixture(scope="session")
def corpus():
    import corpus as builder

    try:
        return builder.build()
    except Exception as exc:  # no sdist copy and no way to download it
        pytest.skip(f"real-template corpus unavailable (pip download {builder.SDIST} failed: {exc})")


def _reference(corpus, where: str) -> str:
    import corpus as builder

    kind, name = where.split(":", 1)
    if kind == "file":
        return (corpus / "templates" / name).read_text(encoding="utf-8")
    refs = builder.references(corpus)
    if kind == "py":
        return refs[PY][name]["template"]
    return next(c["template"] for c in refs[CPP] if c["name"] == name)


def test_every_builtin_names_its_release_and_has_a_reference():
    assert set(REFERENCES) | UNREFERENCED == set(BUILTINS)
    for name, (source, _how) in BUILTINS.items():
        assert source and "/" in source, name  # the model repository it is released in


def test_trl_builtins_are_trls_files_loaded_at_use_time():
    from pathlib import Path

    import trl

    folder = Path(trl.__file__).parent / "chat_templates"
    files = {"phi-3": "phi3", "phi-3.5": "phi3_5", "llama-3": "llama3", "llama-3.1": "llama3_1"}
    files |= {"llama-3.2": "llama3_2", "qwen2.5": "qwen2_5", "gemma": "gemma"}
    for name, stem in files.items():
        assert BUILTINS[name][1] == f"trl:{stem}_chat_template"
        assert builtin_template(name) == (folder / f"{stem}.jinja").read_text(encoding="utf-8"), name


@pytest.mark.parametrize("name", list(REFERENCES))
def test_builtin_is_byte_identical_to_its_reference(corpus, name):
    for where in REFERENCES[name]:
        if (name, where) not in RENDER_ONLY:
            assert builtin_template(name) == _reference(corpus, where), (name, where)


# llama.cpp's own test conversation (tests/test-chat-template.cpp), with the generation prompt
LLAMACPP_CHAT = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]


@pytest.mark.parametrize("name", [n for n, refs in REFERENCES.items() if any(r.startswith("cpp:") for r in refs)])
def test_builtin_renders_what_llamacpp_expects_of_the_release(corpus, name):
    """The rendering llama.cpp's test expects of the release template (its Jinja engine, not transformers')."""
    import corpus as builder
    from transformers.utils.chat_template_utils import render_jinja_template

    where = next(r for r in REFERENCES[name] if r.startswith("cpp:"))
    case = next(c for c in builder.references(corpus)[CPP] if c["name"] == where[4:])
    rendered, _ = render_jinja_template(
        conversations=[LLAMACPP_CHAT],
        chat_template=builtin_template(name),
        add_generation_prompt=True,
        bos_token=case["bos_token"],
        eos_token=case["eos_token"],
    )
    assert rendered[0] == case["expected"]


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
CALL = {"id": "call12345", "type": "function", "function": {"name": "spell_number", "arguments": {"n": 4}}}
SINGLE = [{"role": "user", "content": "Spell 1"}, {"role": "assistant", "content": "one"}]
MULTI = [*SINGLE, {"role": "user", "content": "Spell 2"}, {"role": "assistant", "content": " two "}]
CONVERSATIONS = {
    "single turn": (SINGLE, None),
    "multi-turn": (MULTI, None),
    "system prompt": ([{"role": "system", "content": "Answer in words."}, *MULTI], None),
    "generation prompt": (MULTI[:3], None),
    "tools": (
        [
            {"role": "user", "content": "Spell 4"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "name": "spell_number", "tool_call_id": "call12345", "content": "four-result"},
            {"role": "assistant", "content": "four"},
        ],
        TOOLS,
    ),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_builtin_renders_like_its_reference_on_every_conversation(corpus, name):
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(template, chat, tools, prompt):
        try:
            out, _ = render_jinja_template(
                conversations=[chat],
                tools=tools,
                chat_template=template,
                add_generation_prompt=prompt,
                bos_token="<s>",
                eos_token="</s>",
            )
            return out[0]
        except Exception as exc:  # a release that refuses a role (Gemma: system) refuses it in both
            return f"refused: {exc}"

    rendered = 0
    for chat, tools in CONVERSATIONS.values():
        prompt = chat[-1]["role"] == "user"
        for where in REFERENCES[name]:
            ours = render(builtin_template(name), chat, tools, prompt)
            assert ours == render(_reference(corpus, where), chat, tools, prompt), (name, where, chat)
            rendered += not ours.startswith("refused")
    assert rendered >= 2, name  # single and multi-turn chats render in every release


# built-ins on the vocabularies in the corpus (tests/corpus.py): per-turn end, and which conversations train
# every answer (the rest: the release drops or moves content, which qtune.data.turns counts)
VOCABS = {
    "llama-3": ("llama-bpe", "<|eot_id|>"),
    "llama-3.1": ("llama-bpe", "<|eot_id|>"),
    "llama-3.2": ("llama-bpe", "<|eot_id|>"),
    "qwen2.5": ("qwen2", "<|im_end|>"),
    "chatml": ("qwen2", "<|im_end|>"),
    "phi-3": ("phi-3", "<|end|>"),
    "phi-3.5": ("phi-3", "<|end|>"),
    "mistral-v0.1": ("llama-spm", "</s>"),
    "mistral-v0.2": ("llama-spm", "</s>"),
    "mistral-v0.3": ("llama-spm", "</s>"),
}


@pytest.fixture(scope="session")
def vocab(corpus):
    from transformers import AutoTokenizer

    cache = {}

    def load(name):
        if name not in cache:
            cache[name] = AutoTokenizer.from_pretrained(str(corpus / "tokenizers" / name))
        return cache[name]

    return load


@pytest.mark.parametrize("name", list(VOCABS))
@pytest.mark.parametrize("chat", ["single turn", "multi-turn", "system prompt"])
def test_builtin_trains_every_answer_through_turns(vocab, name, chat):
    """Set by name (as a recipe does) on a template-less tokenizer: every answer and its per-turn end train,
    token by token, nothing else; a release that moves or drops the system prompt is counted, not trained."""
    import copy
    from types import SimpleNamespace

    from qtune.data.templates import use_chat_template

    vocab_name, eot = VOCABS[name]
    tok = copy.deepcopy(vocab(vocab_name))
    tok.chat_template = None
    use_chat_template(SimpleNamespace(data=SimpleNamespace(chat_template=name)), tok)  # what a recipe names
    assert tok.chat_template == builtin_template(name)
    messages = CONVERSATIONS[chat][0]
    if name == "mistral-v0.1" and chat == "system prompt":  # the v0.1 release has no system prompt: refused
        with pytest.raises(Exception, match="Conversation roles must alternate"):
            tokenize_turns(tok, messages)
        return
    out = tokenize_turns(tok, messages)
    spans = trained_spans(tok, out["input_ids"], out["assistant_masks"])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if name == "mistral-v0.3" and chat == "system prompt":
        # the 'v3' release renders the system prompt in the last user turn only: no answer's training context is
        # its inference context, and the training text has no system prompt: counted, not trained
        assert spans == [] and out["qtune_moved"] == 2 and out["qtune_dropped"] == 1
        return
    trims = name.startswith("llama-3") or name == "mistral-v0.3"  # these releases trim the answer (| trim)
    expect = [f"{a.strip() if trims else a}{eot}" for a in answers]
    assert [s.strip() for s in spans] == [e.strip() for e in expect], spans  # decoding may add a leading space
    assert all(s.rstrip().endswith(eot) for s in spans)
    assert out["qtune_trained"] == out["qtune_answers"] == len(answers) and not out["qtune_dropped"]
