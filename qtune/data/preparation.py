"""TRL's own dataset preparation (chat template, tokenization, loss masks) run through a one-layer carrier model,
the token statistics it yields, and the checks that fail loudly on the silent killers before any model loads.

Tokenization, loss masks, truncation and packing are TRL's (SFTTrainer's dataset preparation); this module
runs exactly that preparation for `qtune data` and the checks. Knows nothing about the training loop."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from qtune.config import Recipe
from qtune.data.cache import build_dataset, per_turn_masks
from qtune.data.formats import Rows, is_conversational
from qtune.data.templates import (
    check_chats_render,
    has_generation_markers,
    require_chat_template,
)
from qtune.errors import QtuneError, first_line

CHECK_SAMPLE = 512  # rows `train` checks through TRL's preparation before the model loads


def loss_settings(recipe: Recipe, tokenizer, fmt: str) -> dict:
    """The SFTConfig arguments the data decides: which tokens carry loss, and tokenizing processes. The
    tokenizer carries the recipe's chat template already (templates.use_chat_template, once, in the pipeline)."""
    answers_only = recipe.data.train_on == "completions"
    settings = {"dataset_num_proc": recipe.data.num_proc} if recipe.data.num_proc else {}
    if fmt in ("preference", "unpaired"):  # preference methods score the completions only, always
        return settings
    if fmt == "prompt_only":  # grpo / rloo: the loss is on the generated completions; TRL tokenizes as it generates
        return {}
    if fmt == "text":
        return {**settings, "completion_only_loss": False}
    if per_turn_masks(recipe, tokenizer, fmt):  # pre-tokenized with assistant_masks (qtune.data.turns)
        return {**settings, "completion_only_loss": False}
    if fmt == "messages" and has_generation_markers(tokenizer.chat_template):
        return {**settings, "assistant_only_loss": answers_only}
    return {**settings, "completion_only_loss": answers_only}


def _carrier_model(tokenizer, scores: bool = False):
    """A one-layer model with the tokenizer's vocabulary: SFTTrainer needs a model to prepare data, and the
    preparation does not depend on which (so `qtune data` and the checks never load the real weights). `scores`:
    a sequence classifier with one label, as TRL's RewardTrainer takes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    with torch.device("cpu"):
        return LlamaForSequenceClassification(config) if scores else LlamaForCausalLM(config)


@dataclass
class PreparedRows:
    """Tokenized examples exactly as TRL prepares them (before truncation and packing) + the collator."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    collator: object
    eval_size: int = 0
    stats: dict = field(default_factory=dict)
    cache_files: list[str] = field(default_factory=list)  # the datasets cache files TRL's preparation read or wrote
    turns: dict = field(default_factory=dict)  # per row class: rows, answers, trained, moved, dropped_rows
    pairs: list | None = None  # preference pairs: (prompt_ids, chosen_ids, rejected_ids) as the method's TRL trainer
    # prepares them; kto: (prompt_ids, completion_ids)
    desirable: list | None = None  # kto: each completion's label (true: desirable)
    where: list | None = None  # preference pairs: "file: row N" of each pair, when known


def prepare_pairs_with_trl(recipe: Recipe, tokenizer, dataset, args) -> PreparedRows:
    """Run the method's own TRL preparation (prompt extraction, chat template, eos, tokenization: DPOTrainer's,
    KTOTrainer's, or the experimental ORPOTrainer's / CPOTrainer's) on the train split with the run's config minus
    truncation, so that what truncation would cut can be measured. Preference pairs: PreparedRows holds two examples
    per pair (prompt + chosen, prompt + rejected; the prompt masked) and `pairs` the three id lists. KTO: one example
    per labelled completion, `pairs` holds (prompt_ids, completion_ids) and `desirable` the labels. Reward: TRL
    tokenizes each whole sequence (prompt + answer) and drops pairs longer than max_length instead of cutting them;
    `pairs` holds (shared prefix, chosen rest, rejected rest) and nothing is masked (the head scores it all)."""
    import dataclasses
    import tempfile

    import datasets

    from qtune.training import method_of, trl_class

    method = method_of(recipe)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        if method.reference:  # dpo, kto: no truncation (max_length None), and no reference pass
            changes = {"max_length": None, "precompute_ref_log_probs": False}
            kwargs = {"ref_model": _carrier_model(tokenizer)}  # a reference of its own: nothing is loaded from a hub
        elif not method.generates:  # reward: no filtering by length (max_length None), so it can be measured
            changes, kwargs = {"max_length": None}, {}
        else:  # orpo, simpo: TRL's experimental trainers need an int max_length; one nothing reaches
            changes, kwargs = {"max_length": 2**31 - 1}, {}
        view = dataclasses.replace(args, output_dir=tmp, report_to="none", eval_strategy="no", **changes)
        with _trl_warnings_told_once():
            try:
                trainer = trl_class(method.trainer)(
                    model=_carrier_model(tokenizer, scores=not method.generates),
                    args=view,
                    train_dataset=dataset["train"],
                    processing_class=tokenizer,
                    **kwargs,
                )
            except Exception as exc:
                what = "labelled completions" if recipe.method == "kto" else "preference pairs"
                raise QtuneError(
                    f"data: TRL could not prepare the {what}: {first_line(exc)}",
                    "run `qtune data RECIPE` to see the rows; check data.chat_template",
                ) from None
        prepared = trainer.train_dataset
        desirable = None
        if recipe.method == "kto":
            pairs = list(zip(prepared["prompt_ids"], prepared["completion_ids"], strict=True))
            desirable = list(prepared["label"])
        elif not method.generates:  # reward: whole sequences; the shared prefix stands for the prompt
            pairs = []
            for chosen, rejected in zip(prepared["chosen_ids"], prepared["rejected_ids"], strict=True):
                n = _shared_prefix(chosen, rejected)
                pairs.append((chosen[:n], chosen[n:], rejected[n:]))
        elif "chosen_labels" in prepared.column_names:  # ORPO / CPO: prompt + answer ids, the prompt labelled -100
            pairs = []
            for chosen, chosen_labels, rejected, rejected_labels in zip(
                prepared["chosen_input_ids"],
                prepared["chosen_labels"],
                prepared["rejected_input_ids"],
                prepared["rejected_labels"],
                strict=True,
            ):
                n, m = _masked_prefix(chosen_labels), _masked_prefix(rejected_labels)
                pairs.append((chosen[:n], chosen[n:], rejected[m:]))
        else:
            pairs = list(zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"], strict=True))
        input_ids, labels = [], []
        for prompt, *completions in pairs:
            for completion in completions:
                input_ids.append(prompt + completion)
                # reward: the head reads the whole sequence, prompt included
                labels.append((prompt if not method.generates else [-100] * len(prompt)) + completion)
        out = PreparedRows(input_ids, labels, trainer.data_collator)
        out.pairs = pairs
        out.desirable = desirable
        out.cache_files = [f["filename"] for f in prepared.cache_files]
    out.eval_size = len(dataset["eval"]) if "eval" in dataset else 0
    out.stats = pair_stats(recipe, out)
    out.stats["end_of_turn"] = end_of_turn_id(tokenizer, _schema_of_dataset(dataset["train"]))  # the run's stop
    return out


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids two sequences share (reward pairs: the prompt, as TRL tokenized it in each)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _masked_prefix(labels: list[int]) -> int:
    """How many leading labels are -100 (the prompt, in ORPO's and CPO's tokenized rows)."""
    n = 0
    while n < len(labels) and labels[n] == -100:
        n += 1
    return n


def pair_stats(recipe: Recipe, prepared: PreparedRows) -> dict:
    """Lengths and truncation of preference pairs (or KTO's labelled completions) as TRL will cut them (keep_start at
    max_length, prompt + completion), and the pairs whose prompt alone fills max_length (TRL's DPO and KTO drop
    those silently; ORPO and CPO keep them with nothing to score)."""
    limit = recipe.data.max_length
    lengths, truncated, no_room, same_cut, lost = [], 0, [], [], 0
    trained_tokens = total_tokens = 0
    dropping = recipe.method == "reward"  # TRL's RewardTrainer drops a pair longer than max_length; never cuts one
    for i, (prompt, *completions) in enumerate(prepared.pairs):
        longest = len(prompt) + max(len(c) for c in completions)
        lengths.append(longest)
        if dropping:
            if longest > limit:
                no_room.append(i)
                lost += sum(len(c) for c in completions)
            else:
                trained_tokens += sum(len(prompt) + len(c) for c in completions)
                total_tokens += sum(len(prompt) + len(c) for c in completions)
            continue
        if len(prompt) >= limit:
            no_room.append(i)
        elif longest > limit:
            truncated += 1
            room = limit - len(prompt)
            if len(completions) == 2 and completions[0][:room] == completions[1][:room]:
                same_cut.append(i)  # chosen and rejected differ only after max_length: nothing left to prefer
        for completion in completions:
            kept = max(0, min(len(completion), limit - len(prompt)))
            lost += len(completion) - kept
            trained_tokens += kept
            total_tokens += min(limit, len(prompt) + len(completion))
    n = len(prepared.pairs)
    return {
        "unit": "labelled completions" if prepared.desirable is not None else "preference pairs",
        "desirable": sum(prepared.desirable) if prepared.desirable is not None else None,
        "pairs": n,
        "examples": n,
        "eval_examples": prepared.eval_size,
        "length": _percentiles(lengths),
        "part_lengths": {  # each part on its own: prompt, then chosen / rejected (or KTO's one completion)
            part: _percentiles([len(p[i]) for p in prepared.pairs])
            for i, part in enumerate(
                ("prompt", "chosen", "rejected") if n and len(prepared.pairs[0]) == 3 else ("prompt", "completion")
            )
        },  # fmt: skip
        "max_length": limit,
        "truncated": truncated,
        "answer_tokens_lost": lost,
        "prompt_fills_max_length": len(no_room) if not dropping else 0,
        "dropped": len(no_room) if dropping else 0,  # reward: pairs TRL drops as longer than max_length
        "first_prompt_fills": no_room[0] if no_room else None,
        "same_within_max_length": len(same_cut),  # pairs whose kept chosen and rejected tokens are identical
        "first_same": same_cut[0] if same_cut else None,
        "untrained": len(no_room) + len(same_cut),
        "trained_tokens": trained_tokens,
        "tokens": total_tokens,
    }


def check_pairs(recipe: Recipe, prepared: PreparedRows, where: list[str] | None = None) -> None:
    """Fail loudly where TRL would drop pairs silently: prompts that alone fill data.max_length leave no completion
    token to score (TRL's DPO filters them out), above data.max_untrained_share of the pairs."""
    s = prepared.stats
    same = s.get("same_within_max_length", 0)
    if same and same / max(1, s["pairs"]) > recipe.data.max_untrained_share:
        first = s["first_same"]
        label = where[first] if where and first < len(where) else f"pair {first + 1}"
        raise QtuneError(
            f"data: {same} of {s['pairs']} preference pairs ({100 * same / s['pairs']:.1f}%) have chosen and "
            f"rejected answers that differ only after data.max_length {recipe.data.max_length} tokens: cut there, "
            f"they are identical and teach no preference (first: {label})",
            "raise data.max_length, shorten the prompts, or raise data.max_untrained_share",
        )
    bad = s["prompt_fills_max_length"] or s.get("dropped", 0)
    if not bad or bad / max(1, s["pairs"]) <= recipe.data.max_untrained_share:
        return
    first = s["first_prompt_fills"]
    if s.get("dropped"):  # reward
        label = where[first] if where and first < len(where) else f"pair {first + 1}"
        prompt, *answers = prepared.pairs[first]
        raise QtuneError(
            f"data: {bad} of {s['pairs']} preference pairs ({100 * bad / s['pairs']:.1f}%) are longer than "
            f"data.max_length {recipe.data.max_length} tokens: TRL's RewardTrainer drops them (first: {label}, "
            f"{len(prompt) + max(map(len, answers))} tokens)",
            "raise data.max_length, shorten or drop those pairs, or raise data.max_untrained_share",
        )
    kto = prepared.desirable is not None
    label = where[first] if where and first < len(where) else f"{'example' if kto else 'pair'} {first + 1}"
    scored = "completion" if kto else "chosen or rejected"
    raise QtuneError(
        f"data: {bad} of {s['pairs']} {s['unit']} ({100 * bad / s['pairs']:.1f}%) have a prompt of "
        f"data.max_length {recipe.data.max_length} tokens or more: truncation leaves no {scored} token to "
        f"score (first: {label}, a prompt of {len(prepared.pairs[first][0])} tokens)",
        "raise data.max_length, shorten or drop those prompts, or raise data.max_untrained_share",
    )


def prepare_with_trl(recipe: Recipe, tokenizer, dataset, args) -> PreparedRows:
    """Run TRL's own dataset preparation (chat template, tokenization, loss masks) on the train split, with
    the training's SFTConfig minus truncation and packing, so truncation losses can be measured."""
    import dataclasses
    import tempfile

    import datasets
    from trl import SFTTrainer

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        view = dataclasses.replace(
            args,
            output_dir=tmp,
            max_length=None,
            packing=False,
            padding_free=False,
            report_to="none",
            eval_strategy="no",
            dataset_num_proc=args.dataset_num_proc,
        )
        with _trl_warnings_told_once():
            try:
                trainer = SFTTrainer(
                    model=_carrier_model(tokenizer),
                    args=view,
                    train_dataset=dataset["train"],
                    processing_class=tokenizer,
                )
            except Exception as exc:
                raise QtuneError(
                    f"data: TRL could not prepare the rows: {first_line(exc)}",
                    "run `qtune data RECIPE` to see the rows; check data.chat_template and data.train_on",
                ) from None
        prepared = trainer.train_dataset
        out = PreparedRows(prepared["input_ids"], prepared["labels"], trainer.data_collator)
        out.cache_files = [f["filename"] for f in prepared.cache_files]
    out.eval_size = len(dataset["eval"]) if "eval" in dataset else 0
    out.stats = token_stats(recipe, out, end_of_turn_id(tokenizer, _schema_of_dataset(dataset["train"])))
    return out


@contextlib.contextmanager
def _trl_warnings_told_once():
    """While TRL prepares the rows: its logger's warnings collected (not printed per example), then told once each."""
    said = _TrlWarnings()
    trl_log = logging.getLogger("trl")
    level, propagate = trl_log.level, trl_log.propagate
    trl_log.setLevel(logging.WARNING)
    trl_log.propagate = False
    trl_log.addHandler(said)
    try:
        yield
    finally:
        trl_log.removeHandler(said)
        trl_log.setLevel(level)
        trl_log.propagate = propagate
        said.tell()


class _TrlWarnings(logging.Handler):
    """TRL's warnings during the preparation (e.g. "the tokenized prompt is not a prefix of prompt+completion"),
    told once each, in words, instead of lost in its logger or repeated per example."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record) -> None:
        text = " ".join(record.getMessage().split())
        if text not in self.seen:
            self.seen.append(text)

    def tell(self) -> None:
        import sys

        for text in self.seen:
            print(f"qtune: warning: TRL: {text}", file=sys.stderr)


def _schema_of_dataset(ds) -> str:
    if "input_ids" in ds.column_names:
        return "messages"  # chats qtune tokenized turn by turn
    plain = "text" in ds.column_names or ("prompt" in ds.column_names and isinstance(ds[0]["prompt"], str))
    return "text" if plain else "messages"


def end_of_turn_id(tokenizer, schema: str) -> int | None:
    """The token that closes an answer: the template's per-turn end (qtune.data.turns.end_of_turn_id: what
    closes each assistant turn, special or added), or eos for text and plain prompt/completion rows (TRL
    appends it) and templates where no special token closes a turn."""
    from qtune.data.turns import end_of_turn_id as closing_token

    if schema == "text" or not tokenizer.chat_template:
        return tokenizer.eos_token_id
    found = closing_token(tokenizer)
    return found if found is not None else tokenizer.eos_token_id


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = {p: ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] for p in (50, 90, 99)}
    return {"min": ordered[0], "p50": pick[50], "p90": pick[90], "p99": pick[99], "max": ordered[-1]}


def token_stats(recipe: Recipe, prepared: PreparedRows, eot: int | None) -> dict:
    """Lengths, truncation and masking, as TRL's truncation (keep_start) and packing will see them."""
    limit = recipe.data.max_length
    lengths, truncated, answer_lost, dropped, untrained = [], 0, 0, 0, 0
    trained_tokens = total_tokens = 0
    eot_trained = 0
    for ids, labels in zip(prepared.input_ids, prepared.labels, strict=True):
        lengths.append(len(ids))
        kept = labels[:limit]
        trained = sum(1 for x in labels if x != -100)
        trained_kept = sum(1 for x in kept if x != -100)
        if len(ids) > limit:
            truncated += 1
            answer_lost += trained - trained_kept
        if trained and not trained_kept and not recipe.data.packing:
            dropped += 1
        if not trained_kept:
            untrained += 1
        if eot is not None and any(x == eot for x in kept):
            eot_trained += 1
        trained_tokens += trained_kept
        total_tokens += min(len(ids), limit)
    n = len(lengths)
    return {
        "examples": n,
        "eval_examples": prepared.eval_size,
        "length": _percentiles(lengths),
        "max_length": limit,
        "truncated": truncated,
        "answer_tokens_lost": answer_lost,
        "dropped": dropped,
        "untrained": untrained,
        "trained_tokens": trained_tokens,
        "tokens": total_tokens,
        "end_of_turn": eot,
        "end_of_turn_trained": eot_trained,
    }


def check_training_data(
    recipe: Recipe, tokenizer, fmt: str, rows: list[dict], args, sample: int | None = CHECK_SAMPLE, loud: bool = True
) -> PreparedRows:
    """Before any model loads: render every chat, prepare (a sample of) the rows through TRL exactly as
    training will, and fail loudly on the silent killers. Returns the preparation (for `qtune data`)."""
    from datasets import DatasetDict

    require_chat_template(recipe, tokenizer, fmt, rows)
    if isinstance(rows, Rows) and is_conversational(fmt, rows):
        check_chats_render(rows, tokenizer, recipe.data.on_bad_row)
    built = build_dataset(recipe, tokenizer, fmt, rows, args, stats=True)  # the cache entry training reuses
    train_rows = built["train"]
    turns = {}
    if per_turn_masks(recipe, tokenizer, fmt):
        from qtune.data.turns import STAT_COLUMNS, turn_report

        turns = turn_report(train_rows)
        built = DatasetDict({name: split.remove_columns(STAT_COLUMNS) for name, split in built.items()})
        train_rows = built["train"]
    if fmt == "prompt_only":
        prepared = check_prompts(recipe, tokenizer, rows, train_rows)
        if loud:
            check_prompt_budget(recipe, prepared)
        return prepared
    if sample is not None and len(train_rows) > sample:
        train_rows = train_rows.select(range(sample))
    held_out = {"eval": built["eval"]} if "eval" in built else {}  # counted (for `qtune data`), not prepared
    if fmt in ("preference", "unpaired"):
        prepared = prepare_pairs_with_trl(recipe, tokenizer, DatasetDict(train=train_rows, **held_out), args)
        # rows and prepared pairs are in one order unless a fraction was split off for eval (shuffled)
        prepared.where = getattr(rows, "where", None) if not isinstance(recipe.data.eval_split, float) else None
        if loud:
            check_pairs(recipe, prepared, prepared.where)
        return prepared
    prepared = prepare_with_trl(recipe, tokenizer, DatasetDict(train=train_rows, **held_out), args)
    prepared.turns = turns
    if loud:
        check_trainable(recipe, tokenizer, prepared)
        import sys

        for line in context_losses(prepared.turns):  # below the refusal threshold: said, once
            print(f"qtune: warning: data: {line}", file=sys.stderr)
    return prepared


def context_losses(turns: dict) -> list[str]:
    """One line per row class where the template drops or moves content: what `qtune data` and `train` say."""
    lines = []
    for cls, c in turns.items():
        if c["dropped_rows"]:
            lines.append(
                f"{cls}: {c['dropped_rows']} of {c['rows']} rows lose a system or user message the chat template "
                "does not render (e.g. no system branch): the model never sees it"
            )
        if c["moved"]:
            lines.append(
                f"{cls}: {c['moved']} of {c['answers']} answers are not trained: the chat template places earlier "
                "content differently once the conversation goes on (e.g. the system prompt in the last user turn), "
                "so their training context would differ from the one at inference"
            )
    return lines


def check_context(recipe: Recipe, prepared: PreparedRows) -> None:
    """Refuse when the template drops content from, or moves content in, more than data.max_untrained_share of
    the rows of a class (below it, `qtune data` and `train` say so)."""
    limit = recipe.data.max_untrained_share
    for cls, c in prepared.turns.items():
        lost = [(c["dropped_rows"], "dropped_rows"), (c["moved_rows"], "moved")]
        for lost_rows, key in lost:
            if not (c["rows"] and lost_rows / c["rows"] > limit):
                continue
            only = {k: (v if k in ("rows", "answers", key) else 0) for k, v in c.items()}
            raise QtuneError(
                f"data: {context_losses({cls: only})[0]}",
                "use the template the model was trained with for these rows (or one that renders the system "
                "prompt where it belongs), drop the system prompts, or raise data.max_untrained_share",
            )


def check_trainable(recipe: Recipe, tokenizer, prepared: PreparedRows) -> None:
    """Fail on the silent killers: end-of-turn never trained (pad == eos masking it included), and too many
    examples with no trained token (truncation, a template that marks nothing), and content the chat template
    drops or moves in too many rows of a class (check_context)."""
    if prepared.pairs is not None:
        check_pairs(recipe, prepared, prepared.where)
        return
    if "over_budget" in prepared.stats:  # grpo / rloo prompts
        check_prompt_budget(recipe, prepared)
        return
    check_context(recipe, prepared)
    s = prepared.stats
    answered = s["examples"] - s["untrained"]
    eot = s["end_of_turn"]
    if answered and s["end_of_turn_trained"] == 0:
        name = tokenizer.convert_ids_to_tokens(eot) if eot is not None else "eos"
        pad_is_eos = tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
        raise QtuneError(
            f"data: the end-of-turn token {name!r} carries no loss in any example"
            + (" (pad == eos, and eos is masked with the padding)" if pad_is_eos else "")
            + ": the model would never learn to stop",
            "use a chat template whose {% generation %} block includes the end-of-turn token (or one without "
            "markers: qtune then trains each answer through its turn's end), or give the tokenizer a pad token "
            "distinct from eos",
        )
    if s["examples"] and s["untrained"] / s["examples"] > recipe.data.max_untrained_share:
        raise QtuneError(
            f"data: {s['untrained']} of {s['examples']} examples ({100 * s['untrained'] / s['examples']:.1f}%) have "
            f"no trained token after truncation to data.max_length {recipe.data.max_length}"
            + (f" ({s['answer_tokens_lost']} answer tokens lost to truncation)" if s["answer_tokens_lost"] else ""),
            "raise data.max_length, shorten the prompts, check data.train_on / the chat template, or raise "
            "data.max_untrained_share",
        )


def check_prompts(recipe: Recipe, tokenizer, rows, train_rows) -> PreparedRows:
    """grpo / rloo: every prompt (the eval split's too) as TRL will tokenize it (chat template with the generation
    prompt, or the text), for its length. Prompts longer than data.max_length (the prompt budget) are counted with the
    first one's row; training leaves them out (qtune.data.cache) and check_prompt_budget refuses above
    data.max_untrained_share."""
    from qtune.data.cache import prompt_ids

    every = list(rows) + list(getattr(rows, "eval_rows", None) or [])
    where = getattr(rows, "where", None) or []
    limit = recipe.data.max_length
    ids, over, first_over = [], 0, None
    for i, row in enumerate(every):
        tokens = prompt_ids(tokenizer, row["prompt"])
        if len(tokens) > limit:
            over += 1
            if first_over is None:
                label = where[i] if i < len(where) else f"row {i + 1}"
                first_over = f"{label} ({len(tokens)} tokens)"
        ids.append(tokens)
    eot = end_of_turn_id(tokenizer, "messages" if is_conversational("prompt_only", rows) else "text")
    stats = {
        "rows": len(every),
        "examples": len(train_rows),
        "prompt_tokens": _percentiles([len(x) for x in ids]),
        "over_budget": over,
        "first_over_budget": first_over,
        "max_length": limit,
        "end_of_turn": eot,
        "end_of_turn_trained": True,
    }
    return PreparedRows(input_ids=ids, labels=[[] for _ in ids], collator=None, stats=stats)


def check_prompt_budget(recipe: Recipe, prepared: PreparedRows) -> None:
    """grpo / rloo: refuse when more than data.max_untrained_share of the prompts are longer than data.max_length."""
    s = prepared.stats
    if s["rows"] and s["over_budget"] / s["rows"] > recipe.data.max_untrained_share:
        raise QtuneError(
            f"data: {s['over_budget']} of {s['rows']} prompts ({100 * s['over_budget'] / s['rows']:.1f}%) are longer "
            f"than data.max_length {s['max_length']} tokens, the prompt budget (first: {s['first_over_budget']}); "
            f"training would leave them out, more than data.max_untrained_share {recipe.data.max_untrained_share:g}",
            "raise data.max_length (the estimate adds max_completion_length to it), shorten or drop those prompts, or "
            "raise data.max_untrained_share",
        )
