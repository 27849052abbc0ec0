"""What `qtune data` prints: the sources as read, the token statistics, and samples with masked tokens marked."""

from __future__ import annotations

import sys
from pathlib import Path

from qtune.config import Recipe
from qtune.data.formats import Rows
from qtune.data.preparation import PreparedRows, context_losses
from qtune.data.sources import skipped_text


def describe_sources(rows: Rows) -> list[str]:
    """One line per source: what was read, detected, kept, skipped, ignored."""
    lines = []
    for r in rows.sources:
        how = "detected" if r["detected"] else "set"
        line = f"{r['source']} [{r['split']}]: format {r['format']} ({how}), {r['kept']} rows"
        if r.get("used") is not None and r["used"] != r["kept"]:
            line += f", {r['used']} used after samples/weight"
        if r.get("eval_rows") is not None:
            line += f", {r['eval_rows']} eval rows"
        if r["skipped"]:
            line += (
                f"; skipped {sum(r['skipped'].values())} ({skipped_text(r['skipped'])}), first: {r['first_skipped']}"
            )
        if r["ignored_columns"]:
            line += f"; ignored columns: {', '.join(r['ignored_columns'])}"
        lines.append(line)
    return lines + rows.notes


def warn_skipped(rows: Rows) -> None:
    """Counted warnings for skipped rows (on_bad_row: skip), on stderr."""
    for r in rows.sources:
        if r["skipped"]:
            n = sum(r["skipped"].values())
            print(
                f"qtune: warning: {r['source']}: skipped {n} bad row(s) ({skipped_text(r['skipped'])}); "
                f"first: {r['first_skipped']}",
                file=sys.stderr,
            )


def render_example(tokenizer, input_ids: list[int], labels: list[int], dim: bool = False) -> str:
    """One example's tokens, masked ones (no loss) in [brackets] (or dimmed on a terminal)."""
    out, masked_run = [], []

    def flush():
        if masked_run:
            text = tokenizer.decode(masked_run)
            out.append(f"\x1b[2m{text}\x1b[0m" if dim else f"[{text}]")
            masked_run.clear()

    trained_run: list[int] = []
    for token, label in zip(input_ids, labels, strict=True):
        if label == -100:
            if trained_run:
                out.append(tokenizer.decode(trained_run))
                trained_run.clear()
            masked_run.append(token)
        else:
            flush()
            trained_run.append(token)
    flush()
    if trained_run:
        out.append(tokenizer.decode(trained_run))
    return "".join(out)


def render_pairs(recipe: Recipe, tokenizer, prepared: PreparedRows, lines: list[str], samples: int, dim: bool) -> str:
    """`qtune data` for preference data: pairs (dpo, orpo, simpo) shown as chosen / rejected, labelled completions
    (kto) as desirable / undesirable; lengths and truncation."""
    s = prepared.stats
    length = s["length"]
    method = recipe.method.upper()
    if prepared.desirable is not None:  # kto: labelled completions
        head = [
            f"schema: unpaired; {method} scores each completion against the reference, pulled up when labelled true "
            "(desirable), down when false (the prompt carries no loss)",
            f"labelled completions: {s['pairs']} train ({s['desirable']} desirable, {s['pairs'] - s['desirable']} "
            "undesirable)" + (f", {s['eval_examples']} eval" if s["eval_examples"] else ""),
            f"tokens per example (prompt + completion): min {length.get('min')}, p50 {length.get('p50')}, "
            f"p90 {length.get('p90')}, max {length.get('max')} (max_length {s['max_length']})",
            f"truncated: {s['truncated']} examples, {s['answer_tokens_lost']} completion tokens lost; prompt alone "
            f"fills max_length (nothing left to score): {s['prompt_fills_max_length']}",
        ]
    elif recipe.method == "reward":
        head = [
            "schema: preference; REWARD scores each whole sequence (prompt + answer) with its head and trains the "
            "chosen one to score above the rejected one",
            f"pairs: {s['pairs']} train" + (f", {s['eval_examples']} eval" if s["eval_examples"] else ""),
            f"tokens per pair (the longer sequence): min {length.get('min')}, p50 {length.get('p50')}, "
            f"p90 {length.get('p90')}, max {length.get('max')} (max_length {s['max_length']})",
            f"longer than max_length (TRL drops the pair): {s['dropped']}",
        ]
    else:
        head = [
            f"schema: preference; {method} scores the chosen and rejected completions (the prompt carries no loss)",
            f"pairs: {s['pairs']} train" + (f", {s['eval_examples']} eval" if s["eval_examples"] else ""),
            f"tokens per pair (prompt + longer completion): min {length.get('min')}, p50 {length.get('p50')}, "
            f"p90 {length.get('p90')}, max {length.get('max')} (max_length {s['max_length']})",
            f"truncated: {s['truncated']} pairs, {s['answer_tokens_lost']} completion tokens lost; prompt alone fills "
            f"max_length (nothing left to score): {s['prompt_fills_max_length']}; chosen = rejected once cut at "
            f"max_length: {s['same_within_max_length']}",
        ]
    parts = "; ".join(
        f"{part} p50 {q.get('p50')}, p90 {q.get('p90')}, max {q.get('max')}" for part, q in s["part_lengths"].items()
    )
    lines += [
        *head,
        f"tokens per part: {parts}",
        f"scored tokens: {s['trained_tokens']} of {s['tokens']} ({100 * s['trained_tokens'] / max(1, s['tokens']):.1f}%)",
    ]
    if prepared.cache_files:
        lines.append(f"cache: {Path(prepared.cache_files[0]).parent.parent} (reused by the next run on the same data)")
    limit = recipe.data.max_length
    for i in range(min(samples, s["pairs"])):
        if prepared.desirable is not None:
            kind = "desirable" if prepared.desirable[i] else "undesirable"
            lines += [
                f"--- example {i + 1}, {kind} ([prompt: no loss]) ---",
                render_example(tokenizer, prepared.input_ids[i][:limit], prepared.labels[i][:limit], dim=dim),
            ]
            continue
        for j, name in enumerate(("chosen", "rejected")):
            k = 2 * i + j
            lines += [
                f"--- pair {i + 1}, {name}" + (" ---" if recipe.method == "reward" else " ([prompt: no loss]) ---"),
                render_example(tokenizer, prepared.input_ids[k][:limit], prepared.labels[k][:limit], dim=dim),
            ]
    return "\n".join(lines)


def render_prompts(recipe: Recipe, tokenizer, rows, prepared: PreparedRows, lines: list[str], samples: int) -> str:
    """`qtune data` for grpo / rloo: the prompts as the model sees them before generating, their token lengths against
    the prompt budget (data.max_length), the columns the reward functions get, and N prompts."""
    s = prepared.stats
    section = getattr(recipe, recipe.method)
    q = s["prompt_tokens"]
    rewards = ", ".join(f"{r.name} x {r.weight:g}" for r in section.rewards)
    eval_rows = len(getattr(rows, "eval_rows", None) or [])
    split = (
        f", {eval_rows} in the eval split" if eval_rows else
        f", data.eval_split {recipe.data.eval_split:g} of them held out" if isinstance(recipe.data.eval_split, float)
        else ""
    )  # fmt: skip
    first = list(rows[:1]) if isinstance(rows, list) else []
    columns = sorted(k for k in (first[0] if first else {}) if k != "prompt")
    over = s["over_budget"]
    lines += [
        f"schema: prompt_only; {recipe.method.upper()} generates {section.num_generations} completions of up to "
        f"{section.max_completion_length} tokens per prompt and scores them with: {rewards}",
        f"prompts: {s['rows']}{split}",
        f"prompt tokens (as TRL tokenizes them: chat template + generation prompt, or the text): min {q.get('min')}, "
        f"p50 {q.get('p50')}, p90 {q.get('p90')}, p99 {q.get('p99')}, max {q.get('max')} (prompt budget: "
        f"data.max_length {s['max_length']}; with max_completion_length up to "
        f"{s['max_length'] + section.max_completion_length} tokens per sequence)",
        f"longer than the prompt budget (left out of training): {over} of {s['rows']} "
        f"({100 * over / max(1, s['rows']):.1f}%; refused above data.max_untrained_share "
        f"{recipe.data.max_untrained_share:g})" + (f", first: {s['first_over_budget']}" if over else ""),
        f"columns passed to the reward functions: {', '.join(columns) if columns else 'none'}",
    ]
    for i in range(min(samples, s["rows"])):
        lines += [
            f"--- prompt {i + 1} ({len(prepared.input_ids[i])} tokens) ---",
            tokenizer.decode(prepared.input_ids[i]),
        ]
    return "\n".join(lines)


def render_summary(
    recipe: Recipe, tokenizer, fmt: str, rows: Rows, prepared: PreparedRows, settings: dict, samples: int, dim: bool
) -> str:
    s = prepared.stats
    lines = ["sources:"] + [f"  {line}" for line in describe_sources(rows)] if isinstance(rows, Rows) else []
    if prepared.pairs is not None:
        return render_pairs(recipe, tokenizer, prepared, lines, samples, dim)
    if "over_budget" in s:
        return render_prompts(recipe, tokenizer, rows, prepared, lines, samples)
    loss = (
        "every token"
        if recipe.data.train_on == "all"
        else f"{'the last answer' if recipe.data.train_on == 'last' else 'every answer'} of each chat (masks "
        "derived turn by turn from the chat template)"
        if prepared.turns
        else "assistant turns (TRL assistant_only_loss, {% generation %} markers)"
        if settings.get("assistant_only_loss")
        else "the last answer only (template has no {% generation %} markers; earlier answers are context)"
        if fmt == "messages"
        else "completions (TRL completion_only_loss)"
        if fmt == "prompt_completion"
        else "every token"
    )
    length = s["length"]
    eot = s["end_of_turn"]
    lines += [
        f"schema: {fmt}; loss on {loss}",
        f"examples: {s['examples']} train" + (f", {s['eval_examples']} eval" if s["eval_examples"] else ""),
        f"tokens per example: min {length.get('min')}, p50 {length.get('p50')}, p90 {length.get('p90')}, "
        f"p99 {length.get('p99')}, max {length.get('max')} (max_length {s['max_length']})",
        f"truncated: {s['truncated']} examples, {s['answer_tokens_lost']} answer tokens lost; "
        f"dropped (no answer left): {s['dropped']}",
        f"trained tokens: {s['trained_tokens']} of {s['tokens']} "
        f"({100 * s['trained_tokens'] / max(1, s['tokens']):.1f}%); examples with none: {s['untrained']}",
        f"end of turn {tokenizer.convert_ids_to_tokens(eot) if eot is not None else None!r} trained in "
        f"{s['end_of_turn_trained']} of {s['examples']} examples; pad {tokenizer.pad_token!r}, eos "
        f"{tokenizer.eos_token!r}",
        f"packing: {'on (TRL bfd, padding-free position ids)' if recipe.data.packing else 'off'}",
    ]
    for cls, c in prepared.turns.items():
        lines.append(
            f"{cls}: {c['rows']} rows, {c['trained']} of {c['answers']} answers trained"
            + (f", {c['moved']} with moved context" if c["moved"] else "")
            + (f", {c['dropped_rows']} rows losing content" if c["dropped_rows"] else "")
        )
    lines += [f"warning: {line}" for line in context_losses(prepared.turns)]
    if prepared.cache_files:
        lines.append(f"cache: {Path(prepared.cache_files[0]).parent.parent} (reused by the next run on the same data)")
    for i in range(min(samples, s["examples"])):
        limit = recipe.data.max_length
        lines += [
            f"--- sample {i + 1} ([masked: no loss]) ---",
            render_example(tokenizer, prepared.input_ids[i][:limit], prepared.labels[i][:limit], dim=dim),
        ]
    return "\n".join(lines)
