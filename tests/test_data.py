"""The data path: sources, formats, templates, masking proven token by token on TRL's own batches, mixing,
bad rows, the loud checks, packing and `qtune data`. Fixture files are in tests/data/."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_qtune_in_process, trained_spans, write_jsonl
from qtune import training
from qtune.config import load_recipe
from qtune.data.cache import build_dataset
from qtune.data.loading import load_rows
from qtune.data.preparation import check_training_data, loss_settings, prepare_with_trl
from qtune.data.templates import BUILTINS, RETIRED, builtin_template, use_chat_template
from qtune.errors import QtuneError
from qtune.model import Launch

DATA = Path(__file__).parent / "data"
SINGLE = Launch(1, 0, 0, "NO")


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch) -> Path:
    """An empty datasets cache per test (in process and for `qtune data` subprocesses): a cache hit is earned."""
    import datasets

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


@pytest.fixture
def recipe_for(tmp_path, tiny_llama):
    def make(sources, **data_keys):
        sources = [s if isinstance(s, dict) else {"path": str(s)} for s in sources]
        doc = {
            "model": {"name": str(tiny_llama)},
            "quantization": {"bits": None},
            "data": {"datasets": sources, "max_length": 64, **data_keys},
            "training": {"max_steps": 1, "micro_batch_size": 2, "grad_accum": 1, "gradient_checkpointing": False},
            "output_dir": str(tmp_path / "run"),
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return load_recipe(path, [])

    return make


def _trainer_args(recipe, tokenizer, fmt: str):
    """What qtune.pipeline.prepare does between the tokenizer and the data check: the recipe's chat template set
    once on the tokenizer, then the trainer's config with the loss settings the data decides."""
    use_chat_template(recipe, tokenizer)
    return training.trainer_config(recipe, SINGLE, loss_settings(recipe, tokenizer, fmt))


def _tokenizer(tiny_llama):
    from qtune.config import Recipe
    from qtune.model import load_tokenizer

    return load_tokenizer(
        Recipe.model_validate(
            {"model": {"name": str(tiny_llama)}, "data": {"datasets": [{"path": "x"}]}, "output_dir": "x"}
        )
    )


# --------------------------------------------------------------------------- sources


def _by_prompt(rows):
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


@pytest.mark.parametrize(
    "source, fmt, n",
    [
        ("alpaca.jsonl", "messages", 3),
        ("sharegpt.json", "messages", 2),
        ("messages.jsonl", "messages", 2),
        ("prompt_completion.csv", "prompt_completion", 2),
        ("text.txt", "text", 2),
    ],
)
def test_local_files_of_every_type_load_and_map(recipe_for, source, fmt, n):
    schema, rows = load_rows(recipe_for([DATA / source]))
    assert schema == fmt and len(rows) == n
    assert rows.sources[0]["detected"] is True


def test_parquet_folder_save_to_disk_and_local_repo_with_name_and_split(recipe_for, tmp_path):
    import datasets

    ds = datasets.load_dataset("json", data_files=str(DATA / "alpaca.jsonl"), split="train")
    ds.to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "folder").mkdir()
    shutil.copy(DATA / "alpaca.jsonl", tmp_path / "folder" / "part.jsonl")
    datasets.DatasetDict(train=ds, validation=ds.select([0])).save_to_disk(str(tmp_path / "saved"))

    expected = _by_prompt(load_rows(recipe_for([DATA / "alpaca.jsonl"]))[1])
    for path in (tmp_path / "a.parquet", tmp_path / "folder", tmp_path / "saved"):
        schema, got = load_rows(recipe_for([path]))
        assert schema == "messages" and _by_prompt(got) == expected, path

    # save_to_disk folder, a named eval split
    _, got = load_rows(recipe_for([tmp_path / "saved"], eval_split="validation"))
    assert len(got) == 3 and len(got.eval_rows) == 1

    # a dataset repo folder (Hub layout) with configs: `name` picks the config, `split` the split
    repo = str(DATA / "repo")
    schema, got = load_rows(recipe_for([{"path": repo, "name": "chat"}], eval_split="test"))
    assert schema == "messages" and len(got) == 3 and got.eval_rows[0]["messages"][1]["content"] == "four"
    schema, got = load_rows(recipe_for([{"path": repo, "name": "plain"}]))
    assert schema == "text" and sorted(r["text"] for r in got) == ["one two", "three four"]
    with pytest.raises(QtuneError, match="split 'nope'|nope"):
        load_rows(recipe_for([{"path": repo, "name": "chat", "split": "nope"}]))


# --------------------------------------------------------------------------- formats


def test_formats_map_to_one_schema(recipe_for):
    _, rows = load_rows(recipe_for([DATA / "alpaca.jsonl"]))
    by_answer = {r["messages"][-1]["content"]: r["messages"] for r in rows}
    assert by_answer["one two"] == [
        {"role": "user", "content": "spell the digits\n\n1 2"},
        {"role": "assistant", "content": "one two"},
    ]
    assert by_answer["yes"][0] == {"role": "system", "content": "answer in words"}
    _, rows = load_rows(recipe_for([DATA / "sharegpt.json"]))
    roles = sorted([m["role"] for m in r["messages"]] for r in rows)
    assert roles == [["system", "user", "assistant"], ["user", "assistant", "user", "assistant"]]


def test_column_mapping_and_role_mapping(recipe_for, tmp_path):
    source = {"path": str(DATA / "custom.jsonl"), "format": "prompt_completion"}
    source["columns"] = {"prompt": "question", "completion": "answer"}
    schema, rows = load_rows(recipe_for([source]))
    assert schema == "prompt_completion" and sorted(r["completion"] for r in rows) == ["three", "two"]
    assert rows.sources[0]["ignored_columns"] == ["id"]  # said, not silently dropped

    odd = write_jsonl(
        tmp_path / "odd.jsonl",
        [{"conversations": [{"from": "asker", "value": "spell 1"}, {"from": "bot", "value": "one"}]}],
    )
    with pytest.raises(QtuneError, match="'asker' is not a known speaker"):
        load_rows(recipe_for([odd]))
    _, rows = load_rows(recipe_for([{"path": str(odd), "roles": {"asker": "user", "bot": "assistant"}}]))
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]


def test_undetectable_columns_are_listed(recipe_for):
    with pytest.raises(QtuneError, match=r"cannot tell the format from the columns \['answer', 'id', 'question'\]"):
        load_rows(recipe_for([DATA / "custom.jsonl"]))


# --------------------------------------------------------------------------- bad input


BAD = {
    "null field": (
        '{"instruction": "a", "output": "b"}\n{"instruction": null, "output": "b"}\n',
        "jsonl",
        "row 2",
        "'instruction'",
    ),
    "role order": (
        '{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}\n',
        "jsonl",
        "row 1",
        "wrong role order",
    ),
    "empty answer": (
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "  "}\n',
        "jsonl",
        "row 2",
        "'completion'",
    ),
    "not json": ('{"text": "a"}\n{"text": \n', "jsonl", "row 2", "invalid JSON"),
    "ragged csv": ("prompt,completion\na,b\nc,d,e\nf,g\n", "csv", "row 3", "3 fields where the header has 2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_stop_naming_file_and_row_or_are_skipped_and_counted(recipe_for, tmp_path, case):
    text, suffix, row, problem = BAD[case]
    path = tmp_path / f"bad.{suffix}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(QtuneError) as err:
        load_rows(recipe_for([path]))
    assert str(path) in err.value.message and row in err.value.message and problem in err.value.message
    if case == "role order":  # the only row is bad: skipping leaves nothing, said so
        with pytest.raises(QtuneError, match="every row was skipped"):
            load_rows(recipe_for([path], on_bad_row="skip"))
        return
    _, rows = load_rows(recipe_for([path], on_bad_row="skip"))
    assert sum(rows.sources[0]["skipped"].values()) == 1 and len(rows) >= 1


def test_non_utf8_bytes_are_named(recipe_for, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(QtuneError, match=r"row 2: not valid UTF-8 \(byte 0xe9"):
        load_rows(recipe_for([path]))
    _, rows = load_rows(recipe_for([path], on_bad_row="skip"))
    assert [r["text"] for r in rows] == ["ok"] and rows.sources[0]["skipped"] == {"not UTF-8": 1}


def test_unknown_format_name_is_a_recipe_error(recipe_for):
    with pytest.raises(QtuneError, match="format"):
        recipe_for([{"path": str(DATA / "text.txt"), "format": "vicuna"}])


# --------------------------------------------------------------------------- masking, token by token


def _trainer(recipe, tiny_llama, rows_schema):
    """A real SFTTrainer on the tiny model with the recipe's SFTConfig, as `qtune train` builds it."""
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    fmt, rows = rows_schema
    tokenizer = _tokenizer(tiny_llama)
    args = _trainer_args(recipe, tokenizer, fmt)
    args = __import__("dataclasses").replace(args, output_dir=str(Path(recipe.output_dir) / "ck"))
    dataset = build_dataset(recipe, tokenizer, fmt, rows)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset["train"], processing_class=tokenizer)
    return trainer, tokenizer, args


def _trained_spans(tokenizer, ids, labels) -> list[str]:
    """The decoded runs of tokens that carry loss, in order."""
    return trained_spans(tokenizer, ids, [label != -100 for label in labels])


def _batch_spans(trainer, tokenizer):
    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])  # a collated TRL batch
    out = []
    for ids, labels, mask in zip(
        batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist(), strict=True
    ):
        ids_text = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
        out.append((ids_text, _trained_spans(tokenizer, ids, labels)))
    return sorted(out)


CASES = {
    # source, data keys, expected {rendered prompt fragment: trained spans}
    "alpaca": (
        "alpaca.jsonl",
        {},
        {"spell 4 7": ["four seven <|im_end|>"], "1 2": ["one two <|im_end|>"], "say yes": ["yes <|im_end|>"]},
    ),
    "sharegpt multi-turn": (
        "sharegpt.json",
        {},
        {"spell 2": ["one <|im_end|>", "two <|im_end|>"], "spell 3": ["three <|im_end|>"]},
    ),
    "messages multi-turn with system": (
        "messages.jsonl",
        {},
        {"spell 6 7": ["five <|im_end|>", "six seven <|im_end|>"], "spell 8": ["eight <|im_end|>"]},
    ),
    "prompt_completion": (
        "prompt_completion.csv",
        {},
        {"spell 9": ["nine <|im_end|>"], "spell 1": ["one two <|im_end|>"]},
    ),
    "text": (
        "text.txt",
        {},
        {"one two": ["one two three four <|im_end|>"], "five": ["five six seven eight <|im_end|>"]},
    ),
    "train_on all": ("alpaca.jsonl", {"train_on": "all"}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exactly_the_answer_tokens_and_end_of_turn_carry_loss(recipe_for, tiny_llama, case):
    source, keys, expected = CASES[case]
    recipe = recipe_for([DATA / source], **keys)
    trainer, tokenizer, args = _trainer(recipe, tiny_llama, load_rows(recipe))
    got = _batch_spans(trainer, tokenizer)
    if expected is None:  # train_on: all: every real token carries loss, as one run
        assert all(len(spans) == 1 and spans[0] == text for text, spans in got), got
        return
    assert len(got) == len(expected)
    for text, spans in got:
        key = next(k for k in expected if k in text)
        assert spans == expected[key], (text, spans)
    # `qtune data` (a carrier model, no weights) prepares exactly what the trainer trains on
    prepared = prepare_with_trl(recipe, tokenizer, build_dataset(recipe, tokenizer, *load_rows(recipe)), args)
    assert sorted(prepared.labels) == sorted(trainer.train_dataset["labels"])


def test_template_without_generation_markers_trains_every_answer_or_the_last(recipe_for, tiny_llama):
    from qtune.tiny import CHATML_TEMPLATE

    # issue 15: every answer of a chat trains on a template without markers (masks derived turn by turn);
    # train_on: last keeps what such templates trained before (the last answer only)
    plain = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    recipe = recipe_for([DATA / "messages.jsonl"], chat_template=plain)
    trainer, tokenizer, _ = _trainer(recipe, tiny_llama, load_rows(recipe))
    spans = dict(_batch_spans(trainer, tokenizer))
    assert sorted(spans.values()) == [["eight <|im_end|>"], ["five <|im_end|>", "six seven <|im_end|>"]]
    recipe = recipe_for([DATA / "messages.jsonl"], chat_template=plain, train_on="last")
    trainer, tokenizer, _ = _trainer(recipe, tiny_llama, load_rows(recipe))
    spans = dict(_batch_spans(trainer, tokenizer))
    assert sorted(spans.values()) == [["eight <|im_end|>"], ["six seven <|im_end|>"]]


# --------------------------------------------------------------------------- templates


def test_builtin_templates_render_their_family_format(tiny_llama):
    from qtune.data.turns import tokenize_turns

    tokenizer = _tokenizer(tiny_llama)
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    expected = {
        "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
        "llama-3": "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU1"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
        "mistral-v0.2": "<s> [INST] S\n\nU1 [/INST] A1</s> [INST] U2 [/INST] A2</s>",
    }
    assert set(expected) <= set(BUILTINS) and not set(RETIRED) & set(BUILTINS)
    for name, text in expected.items():
        template = builtin_template(name)
        assert tokenizer.apply_chat_template(chat, tokenize=False, chat_template=template) == text, name
        # no {% generation %} markers (released templates have none): every answer trains through qtune.data.turns
        tokenizer.chat_template = template
        out = tokenize_turns(tokenizer, chat)
        assert out["qtune_trained"] == 2 and sum(out["assistant_masks"]) > 0, name


def test_builtin_template_must_match_the_tokenizers_own(recipe_for, tiny_llama):
    tokenizer = _tokenizer(tiny_llama)
    use_chat_template(recipe_for([DATA / "text.txt"], chat_template="chatml"), tokenizer)  # same render: ok
    with pytest.raises(QtuneError, match="'llama-3' renders differently from the tokenizer's saved chat_template"):
        use_chat_template(recipe_for([DATA / "text.txt"], chat_template="llama-3"), _tokenizer(tiny_llama))
    with pytest.raises(QtuneError, match="unknown template 'vicuna'"):
        use_chat_template(recipe_for([DATA / "text.txt"], chat_template="vicuna"), _tokenizer(tiny_llama))
    with pytest.raises(QtuneError, match="fails to render"):
        use_chat_template(
            recipe_for([DATA / "text.txt"], chat_template="{{ messages[0]['content'] | nofilter }}"),
            _tokenizer(tiny_llama),
        )
    tokenizer = _tokenizer(tiny_llama)
    tokenizer.chat_template = None  # a base model: any built-in may be chosen
    use_chat_template(recipe_for([DATA / "text.txt"], chat_template="llama-3.1"), tokenizer)
    assert tokenizer.chat_template == builtin_template("llama-3.1")
    for retired in RETIRED:  # earlier built-ins that matched no release: refused, naming the choices
        with pytest.raises(QtuneError, match=f"'{retired}' is no longer a built-in") as err:
            use_chat_template(recipe_for([DATA / "text.txt"], chat_template=retired), _tokenizer(tiny_llama))
        assert "mistral-v0.3" in err.value.hint


# --------------------------------------------------------------------------- mixing and splits


def test_mixing_weights_samples_seeded_shuffle_dedup_and_fraction_split(recipe_for, tiny_llama, tmp_path):
    alpaca = {"path": str(DATA / "alpaca.jsonl"), "samples": 7}
    share = {"path": str(DATA / "sharegpt.json"), "weight": 0.5}
    _, rows = load_rows(recipe_for([alpaca, share]))
    assert len(rows) == 8 and [s["used"] for s in rows.sources] == [7, 1]
    _, again = load_rows(recipe_for([alpaca, share]))
    assert list(rows) == list(again)  # deterministic by seed
    _, deduped = load_rows(recipe_for([alpaca, share], dedup=True))
    assert len(deduped) == 4 and "dedup dropped 4" in deduped.notes[0]
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"{i}"} for i in range(40)])
    first = [r["text"] for r in load_rows(recipe_for([big]))[1]]
    doc = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    doc["training"]["seed"] = 7
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(doc))
    other = [r["text"] for r in load_rows(load_recipe(tmp_path / "recipe.yaml", []))[1]]
    assert first != other and sorted(first) == sorted(other)

    with pytest.raises(QtuneError, match="different schemas"):
        load_rows(recipe_for([DATA / "alpaca.jsonl", DATA / "text.txt"]))
    recipe = recipe_for([big], eval_split=0.25)
    built = build_dataset(recipe, _tokenizer(tiny_llama), *load_rows(recipe))
    assert len(built["train"]) == 30 and len(built["eval"]) == 10


# --------------------------------------------------------------------------- loud checks


def test_end_of_turn_never_trained_fails_loudly(recipe_for, tiny_llama):
    from qtune.tiny import CHATML_TEMPLATE

    # the answer is marked for training, its <|im_end|> is not: the model would never learn to stop
    broken = CHATML_TEMPLATE.replace(
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    assert broken != CHATML_TEMPLATE
    recipe = recipe_for([DATA / "messages.jsonl"], chat_template=broken)
    tokenizer = _tokenizer(tiny_llama)
    fmt, rows = load_rows(recipe)
    args = _trainer_args(recipe, tokenizer, fmt)
    with pytest.raises(QtuneError, match="end-of-turn token '<\\|im_end\\|>' carries no loss in any example"):
        check_training_data(recipe, tokenizer, fmt, rows, args)


def test_too_many_untrained_examples_fail_loudly(recipe_for, tiny_llama, tmp_path):
    long_prompt = write_jsonl(
        tmp_path / "long.jsonl",
        [{"prompt": "spell " + "1 " * 40, "completion": "one"}, {"prompt": "spell 2", "completion": "two"}],
    )
    recipe = recipe_for([long_prompt], max_length=16)
    tokenizer = _tokenizer(tiny_llama)
    fmt, rows = load_rows(recipe)
    args = _trainer_args(recipe, tokenizer, fmt)
    with pytest.raises(QtuneError, match=r"1 of 2 examples \(50.0%\) have no trained token after truncation"):
        check_training_data(recipe, tokenizer, fmt, rows, args)


@pytest.mark.parametrize("template", ["own, with generation markers", "chatml"])
def test_truncation_keeps_the_turns_that_fit(recipe_for, tiny_llama, tmp_path, template):
    """A conversation longer than data.max_length is not refused when its first answers fit: TRL cuts its end
    (keep_start), and the answers before the cut train, each with its end-of-turn, token by token, as training
    gets them (the tokenizer's own template: TRL's assistant-only loss; a built-in: qtune.data.turns)."""
    import dataclasses

    from trl import SFTTrainer

    from qtune.data.preparation import _carrier_model

    chat = [
        {"role": "user", "content": "spell 1"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "spell 2"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "spell a long number " + "9 " * 60},
        {"role": "assistant", "content": "nine " * 60},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": chat}])
    chosen = {"chat_template": "chatml"} if template == "chatml" else {}
    tokenizer = _tokenizer(tiny_llama)
    use_chat_template(recipe_for([path], **chosen), tokenizer)
    fits = len(tokenizer.apply_chat_template(chat[:4], tokenize=True, return_dict=True)["input_ids"])
    limit = fits + 4  # the first two answers fit; the cut falls inside the third user turn
    full = len(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    assert full > limit + 100

    recipe = recipe_for([path], max_length=limit, **chosen)
    tokenizer = _tokenizer(tiny_llama)
    fmt, rows = load_rows(recipe)
    args = _trainer_args(recipe, tokenizer, fmt)
    prepared = check_training_data(recipe, tokenizer, fmt, rows, args)  # not refused
    s = prepared.stats
    assert s["truncated"] == 1 and s["untrained"] == 0 and s["dropped"] == 0 and s["answer_tokens_lost"] > 60
    assert s["end_of_turn_trained"] == 1

    # what training gets: TRL's own preparation with the training's max_length, and its collator
    built = build_dataset(recipe, tokenizer, fmt, rows, args)
    trainer = SFTTrainer(
        model=_carrier_model(tokenizer),
        args=dataclasses.replace(args, output_dir=str(tmp_path / "trl"), report_to="none"),
        train_dataset=built["train"],
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert len(ids) == limit and ids == prepared.input_ids[0][:limit]  # keep_start: the conversation's start
    assert labels == prepared.labels[0][:limit]  # the untruncated masks, cut: token by token
    spans = _trained_spans(tokenizer, ids, labels)  # decoding puts a space before a special token
    assert [span.replace(" ", "") for span in spans] == ["one<|im_end|>", "two<|im_end|>"], spans
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert next(i for i, x in enumerate(labels) if x != -100) == len(prompt["input_ids"])  # from the answer on


def test_mistral_builtin_on_a_template_less_tokenizer_trains_every_end_of_turn(recipe_for, tiny_llama):
    recipe = recipe_for([DATA / "messages.jsonl"], chat_template="mistral-v0.2")
    tokenizer = _tokenizer(tiny_llama)
    tokenizer.chat_template = None
    fmt, rows = load_rows(recipe)
    args = _trainer_args(recipe, tokenizer, fmt)
    prepared = check_training_data(recipe, tokenizer, fmt, rows, args)  # a system prompt folds into the first [INST]
    assert prepared.stats["end_of_turn_trained"] == 2


# Like mistral's / llama-2's own templates, which raise for roles they cannot render.
NO_SYSTEM = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "template, rows, bad_row, reason",
    [
        ("no-system", "messages.jsonl", 1, "System role not supported"),
        ("mistral-v0.1", "tool.jsonl", 2, "Conversation roles must alternate"),
    ],
)
def test_template_that_refuses_a_row_names_file_and_row(
    recipe_for, tiny_llama, tmp_path, template, rows, bad_row, reason
):
    from qtune.tiny import CHATML_TEMPLATE

    if rows == "tool.jsonl":  # valid for qtune (a tool result between two answers), refused by mistral's alternation
        chat = [{"role": "user", "content": "spell 1"}, {"role": "assistant", "content": "one"}]
        tool = [*chat[:1], {"role": "assistant", "content": "call"}, {"role": "tool", "content": "1"}, chat[1]]
        path = write_jsonl(tmp_path / "tool.jsonl", [{"messages": chat}, {"messages": tool}])
    else:
        path = DATA / rows
    chosen = NO_SYSTEM + CHATML_TEMPLATE if template == "no-system" else template
    tokenizer = _tokenizer(tiny_llama)
    if template == "mistral-v0.1":
        tokenizer.chat_template = None  # a base model: any built-in may be chosen
    for on_bad_row in ("error", "skip"):
        recipe = recipe_for([path], chat_template=chosen, on_bad_row=on_bad_row)
        fmt, rows_ = load_rows(recipe)
        args = _trainer_args(recipe, tokenizer, fmt)
        if on_bad_row == "error":
            with pytest.raises(QtuneError) as err:
                check_training_data(recipe, tokenizer, fmt, rows_, args)
            message = err.value.message
            assert f"{path.name}: row {bad_row}: the chat template fails to render it: {reason}" in message, message
            continue
        prepared = check_training_data(recipe, tokenizer, fmt, rows_, args)
        assert len(rows_) == 1 and prepared.stats["examples"] == 1  # dropped, not silently rendered wrong
        assert (
            f"skipped 1 row(s) the chat template refused; first: data.datasets: {path}: row {bad_row}"
            in (rows_.notes[-1])
        )


# --------------------------------------------------------------------------- pad token


def _padless_tokenizer(path: Path, reserved: list[str]) -> Path:
    """qtune.tiny's tokenizer without pad and unk tokens (like Llama-3's), plus `reserved` special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qtune.tiny import BASE_WORDS, CHATML_TEMPLATE, DIGITS, PUNCT

    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", *reserved]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + DIGITS + PUNCT + BASE_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(True)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "</s>", *reserved],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)
    return path


def test_pad_token_is_an_unused_reserved_token_else_eos_with_end_of_turn_still_trained(
    recipe_for, tiny_llama, tmp_path, capsys
):
    from qtune.model import load_tokenizer

    recipe = recipe_for([DATA / "messages.jsonl"])
    reserved = ["<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]

    def with_tokenizer(folder: Path):
        return recipe.model_copy(update={"model": recipe.model.model_copy(update={"tokenizer": str(folder)})})

    tokenizer = load_tokenizer(with_tokenizer(_padless_tokenizer(tmp_path / "reserved", reserved)))
    assert tokenizer.unk_token is None and tokenizer.pad_token == "<|reserved_special_token_0|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and "padding with eos" not in capsys.readouterr().err

    recipe = with_tokenizer(_padless_tokenizer(tmp_path / "none", []))
    tokenizer = load_tokenizer(recipe)  # nothing free ('</s>' is no pad and <|im_end|> is the template's)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert "padding with eos '<|im_end|>'" in capsys.readouterr().err
    fmt, rows = load_rows(recipe)
    args = _trainer_args(recipe, tokenizer, fmt)
    prepared = check_training_data(recipe, tokenizer, fmt, rows, args)  # the loud check passes: eos is trained
    batch = prepared.collator(
        [{"input_ids": i, "labels": lab} for i, lab in zip(prepared.input_ids, prepared.labels, strict=True)]
    )
    eos = tokenizer.eos_token_id
    trained_eos, padded = [], 0
    for ids, labels, mask in zip(
        batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist(), strict=True
    ):
        padding = [(t, lab) for t, lab, m in zip(ids, labels, mask, strict=True) if not m]
        assert all(t == eos and lab == -100 for t, lab in padding)  # padding is eos, and carries no loss
        padded += len(padding)
        trained_eos.append(sum(1 for t, lab, m in zip(ids, labels, mask, strict=True) if m and t == eos and lab == eos))
    assert padded and sorted(trained_eos) == [1, 2]  # yet every answer's own eos is trained (2 answers + 1)


# --------------------------------------------------------------------------- packing


def test_packing_changes_the_batches_not_the_per_token_loss(recipe_for, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from conftest import spell_rows

    path = write_jsonl(tmp_path / "spell.jsonl", spell_rows(24, seed=3))
    results = {}
    for packing in (False, True):
        recipe = recipe_for([path], packing=packing, max_length=64)
        tokenizer = _tokenizer(tiny_llama)
        fmt, rows = load_rows(recipe)
        args = _trainer_args(recipe, tokenizer, fmt)
        args = __import__("dataclasses").replace(
            args, output_dir=str(tmp_path / f"ck{packing}"), per_device_eval_batch_size=4
        )
        ds = build_dataset(recipe, tokenizer, fmt, rows)["train"]
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds, processing_class=tokenizer)
        batches = len(trainer.get_eval_dataloader())
        results[packing] = (batches, trainer.evaluate()["eval_loss"])
    assert results[True][0] < results[False][0]  # fewer, fuller rows
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-4)  # packed examples do not see each other


# --------------------------------------------------------------------------- the datasets cache


def test_second_run_is_served_from_the_datasets_cache_and_changes_make_new_entries(
    recipe_for, tiny_llama, tmp_path, own_datasets_cache
):
    cache = own_datasets_cache
    recipe_for([DATA / "messages.jsonl"])

    def arrow_files() -> dict[Path, int]:
        return {f: f.stat().st_mtime_ns for f in (cache / "qtune").rglob("*.arrow")}

    # Two real runs, two processes: the second re-tokenizes nothing (no new or rewritten cache file).
    first = run_qtune_in_process("data", tmp_path / "recipe.yaml", "-n", "0")
    assert first.returncode == 0, first.stderr
    entries = list((cache / "qtune").iterdir())
    files = arrow_files()
    assert len(entries) == 1 and len(files) >= 3  # the saved rows + TRL's tokenization and label maps
    assert f"cache: {entries[0]}" in first.stdout
    second = run_qtune_in_process("data", tmp_path / "recipe.yaml", "-n", "0")
    assert second.returncode == 0, second.stderr
    assert arrow_files() == files and second.stdout == first.stdout

    # In process: the preparation reads exactly those files; another template or other rows make new ones.
    def prepare(recipe, tokenizer):
        fmt, rows = load_rows(recipe)
        args = _trainer_args(recipe, tokenizer, fmt)
        return check_training_data(recipe, tokenizer, fmt, rows, args, sample=None, loud=False)

    again = prepare(recipe_for([DATA / "messages.jsonl"]), _tokenizer(tiny_llama))
    assert again.cache_files and {Path(f) for f in again.cache_files} <= set(files) and arrow_files() == files

    base = _tokenizer(tiny_llama)
    base.chat_template = None  # another template (same rows): the same saved rows, new tokenization files
    other = prepare(recipe_for([DATA / "messages.jsonl"], chat_template="llama-3"), base)
    assert list((cache / "qtune").iterdir()) == entries
    assert not {Path(f) for f in other.cache_files} & set(files) and set(files) < set(arrow_files())
    assert other.input_ids != again.input_ids

    edited = write_jsonl(tmp_path / "edited.jsonl", [json.loads(line) for line in (DATA / "messages.jsonl").open()][:1])
    prepare(recipe_for([edited]), _tokenizer(tiny_llama))  # other data: a new entry
    assert len(list((cache / "qtune").iterdir())) == 2


# --------------------------------------------------------------------------- the command


def test_qtune_data_prints_summary_and_bracketed_samples(recipe_for, tmp_path):
    recipe_for([DATA / "sharegpt.json", DATA / "alpaca.jsonl"], eval_split=0.2)
    result = run_qtune_in_process("data", tmp_path / "recipe.yaml", "-n", "2", "data.max_length=12")
    assert result.returncode == 2 and "have no trained token after truncation" in result.stderr  # loud, after
    assert "answer tokens lost" in result.stdout  # the summary showing why
    result = run_qtune_in_process(
        "data", tmp_path / "recipe.yaml", "-n", "2", "data.max_length=12", "data.max_untrained_share=1"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "sharegpt.json [train]: format sharegpt (detected), 2 rows" in out
    assert "alpaca.jsonl [train]: format alpaca (detected), 3 rows" in out
    assert "tokens per example: min" in out and "p90" in out and "(max_length 12)" in out
    assert re.search(r"truncated: [1-9]\d* examples, [1-9]\d* answer tokens lost", out)
    assert "end of turn '<|im_end|>' trained in" in out
    assert "--- sample 2" in out and "[<|im_start|> user" in out
    assert not (tmp_path / "run").exists()  # nothing written into the run directory

    bad = run_qtune_in_process("data", tmp_path / "recipe.yaml", "data.chat_template=llama-3")
    assert bad.returncode == 2 and "renders differently" in bad.stderr and "Traceback" not in bad.stderr


def test_trl_warnings_during_preparation_are_told_once_each_and_the_logger_restored(capsys):
    import logging

    from qtune.data.preparation import _trl_warnings_told_once

    trl_log = logging.getLogger("trl.trainer.sft_trainer")
    root = logging.getLogger("trl")
    before = (root.level, root.propagate, list(root.handlers))
    with pytest.raises(RuntimeError), _trl_warnings_told_once():
        for _ in range(3):  # once per example, as TRL logs it
            trl_log.warning("Mismatch between tokenized prompt and the start of tokenized prompt+completion.")
        trl_log.info("not a warning")
        trl_log.warning("another   warning\n  across lines")
        raise RuntimeError("a failed preparation still tells them")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "qtune: warning: TRL: Mismatch between tokenized prompt and the start of tokenized prompt+completion.",
        "qtune: warning: TRL: another warning across lines",
    ]
    assert (root.level, root.propagate, list(root.handlers)) == before
