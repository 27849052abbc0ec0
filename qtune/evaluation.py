"""`qtune eval`: is the adapter better than the base, and where? Held-out figures for a finished run, written to
RUN_DIR/eval/ (eval.json, generations.jsonl, a one-page report.html).

    evaluate_run(run_dir, data=None, base=False, n=20, max_new_tokens=256)   # the CLI and the Python API
      ├ RunDir.open                         the run read back: recipe, adapter, tokenizer saved with it
      ├ data.loading.load_rows              the run's eval split (data.eval_split) or --data, read as training reads
      ├ pipeline.prepare_eval               tokenizer + chat template + the trainer config, as training made them
      ├ data.cache.build_dataset            the same split training held out (cached by content)
      ├ model.load_trained                  ONE 4-bit base as trained + the adapter; the base = the adapter disabled
      ├ loss: SFTTrainer.evaluate()         chats / text: TRL's own eval loss on the masked labels (the eval_loss
      │                                     training logs), perplexity = exp(loss), TRL's token accuracy
      ├ pairs: log-probs / scores           preference pairs as TRL's DPOTrainer (RewardTrainer) prepares them:
      │                                     chosen above rejected (log-prob, implicit reward, reward model score)
      └ generations                         greedy, the run's stop tokens; exact match and ROUGE-L (rouge-score)

What is measured, per kind of data:
- chats, prompt/completion, text: `loss` and `perplexity` (TRL's SFT eval loss: the tokens training puts loss on);
  generations for the prompts (the conversation up to its last answer), compared with that answer.
- preference pairs (prompt / chosen / rejected): `loss` / `perplexity` of the chosen completion (per token),
  `preference_accuracy` (the chosen completion more likely than the rejected one) and `reward_accuracy`: the
  implicit reward beta·log(policy / reference) for dpo, kto, orpo and simpo runs (the reference is the run's
  starting point: the base, i.e. the adapter disabled, or model.adapter when the run continued one), the reward
  model's score for a `method: reward` run, the log-prob comparison for other runs; generations answer the prompt,
  compared with the chosen answer.
- prompts alone: generations only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

from qtune.errors import QtuneError

DEFAULT_SAMPLES = 20
DEFAULT_MAX_NEW_TOKENS = 256
# Methods whose result is read through TRL's implicit reward: beta · (log-prob under the policy − under the reference).
IMPLICIT_REWARD = ("dpo", "kto", "orpo", "simpo")
CHAT_SCHEMAS = ("messages", "prompt_completion", "text")
VERSIONS = ("qtune", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "rouge-score")
# The figures, in the order reports show them: key, label, kind (pct: a share shown in %; loss: lower is better).
FIGURES = (
    ("loss", "loss", "loss"),
    ("perplexity", "perplexity", "loss"),
    ("token_accuracy", "token accuracy", "pct"),
    ("exact_match", "exact match", "pct"),
    ("rouge_l", "ROUGE-L", "score"),
    ("preference_accuracy", "preference accuracy", "pct"),
    ("reward_accuracy", "reward accuracy", "pct"),
    ("reward_margin", "reward margin", "score"),
    ("stopped", "answers that stop", "pct"),
)


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | None = None,
    base: bool = False,
    n: int = DEFAULT_SAMPLES,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    quiet: bool = False,
    command: str | None = None,
    log=print,
) -> dict:
    """Evaluate a finished run on its eval split (or `data`: a file, folder or Hub dataset id in any format `qtune
    data` reads) and write RUN_DIR/eval/ (staged beside it, renamed into place; nothing else in the run dir changes
    but the manifest's line for it and the lock file's holder). Returns what eval.json holds (`generations`: the answers, as
    generations.jsonl). `base`: the base's figures too (the same loaded model with the adapter disabled). `n`:
    prompts to generate answers for (all of them when the data has fewer). `quiet`: no progress bar."""
    from qtune.rundir import RunDir

    if n < 0:
        raise QtuneError(f"-n: {n} prompts; give 0 (no generations) or more")
    if max_new_tokens < 1:
        raise QtuneError(f"--max-new-tokens: {max_new_tokens}; give 1 or more")
    run = RunDir.open(run_dir)
    run.check_unlocked()  # a train (or merge) at work on it: the adapter may change under the eval
    with _library_bars_off():
        result = _evaluate(run, data, base, n, max_new_tokens, quiet, command)
    _write(run, result, log)
    return result


def _evaluate(run, data: str | None, base: bool, n: int, max_new_tokens: int, quiet: bool, command) -> dict:
    from qtune import pipeline
    from qtune.data.loading import load_rows

    recipe = _recipe_for_data(run, data)
    try:
        fmt, rows = load_rows(recipe)
    except QtuneError as exc:
        if data is None:  # the run's own sources, read again: moved or deleted since training
            exc.hint = (f"{exc.hint}; " if exc.hint else "") + (
                f"qtune eval reads the run's data sources ({run.recipe_file}) again to find its eval split: run it "
                "where training ran, or pass --data"
            )
        raise
    recipe = _recipe_for_method(run, recipe, fmt, data)
    prepared = pipeline.prepare_eval(recipe, fmt, rows)
    held_out = _held_out(prepared, data)
    notes = [f"data: {note}" for note in rows.notes]
    samples = [_sample(row, fmt) for row in held_out] if fmt != "text" and _generates(run.recipe) else []
    if data is not None and len(rows.where) == len(held_out):
        for sample, where in zip(samples, rows.where, strict=False):
            sample["row"] = where.removeprefix("data.datasets: ")  # the file and row number
    if n > len(samples) and samples:
        notes.append(f"-n {n}: the data has {len(samples)} prompts; answers were generated for all {len(samples)}")
        print(f"qtune: eval: {notes[-1]}", file=sys.stderr)
    if not samples and fmt == "text":
        notes.append("text rows have no prompt and answer: loss and perplexity only, no generations")
    samples = samples[:n]

    model = _load(run, recipe, prepared.tokenizer)
    tuned, base_figures, meaning = {}, ({} if base else None), {}
    if fmt in CHAT_SCHEMAS:
        _sft_loss(prepared, model, _held_out(prepared, data, tokenized=True), tuned, base_figures)
        meaning["loss"] = "TRL's SFT eval loss on the held-out rows (the tokens training puts loss on): eval_loss"
    elif fmt == "preference":
        meaning.update(_pair_figures(run, prepared, model, held_out, tuned, base_figures, notes))
    if "loss" in tuned:
        meaning["perplexity"] = "exp(loss)"
    if samples:
        _generations(run, prepared, model, samples, max_new_tokens, base, quiet, tuned, base_figures)
        meaning["stopped"] = "answers that end with a stop token of the run (not cut at --max-new-tokens)"
        if "exact_match" in tuned:
            meaning["exact_match"] = "the greedy answer equals the reference answer (both stripped of outer spaces)"
            meaning["rouge_l"] = "ROUGE-L F1 of answer vs reference (Google's rouge-score, its default tokenizer)"

    result = {
        "qtune_eval": 1,
        "command": command,
        "run_dir": str(run.path),
        "model": {
            "base": run.recipe.model.name,
            "adapter": str(run.adapter),
            "method": run.recipe.method,
            "quantization": _quantization(run.recipe),
        },
        "data": _data_description(run, data, fmt, held_out),
        "settings": {
            "samples": len(samples),
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
            "stop_tokens": _stop_description(run, prepared.tokenizer) if samples else None,
            "batch_size": _batch_size(prepared),
        },
        "tuned": tuned,
        "base": base_figures,
        "meaning": meaning,
        "notes": notes,
        "versions": library_versions(VERSIONS),
    }
    result["generations"] = _generation_records(samples)  # written to generations.jsonl, not to eval.json
    return result


@contextlib.contextmanager
def _library_bars_off():
    """The libraries' own progress bars (weights loading, TRL's dataset preparation) off while eval runs: its one bar
    is over the prompts. Restored afterwards (the Python API may run in a notebook that wants them)."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_off, hf_on = datasets.utils.are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not datasets_off:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- the run and its data


def _recipe_for_data(run, data: str | None):
    """The run's recipe reading the data eval scores: its own eval split, or every row of `data`. Tracking and Hub
    pushes off (an eval reports nowhere); the tokenizer is the one saved with the adapter (training's, template set)."""
    from qtune.config import Recipe

    d = run.recipe.model_dump()
    if data is None:
        if run.recipe.data.eval_split is None:
            raise QtuneError(
                f"{run.path}: the run has no eval split (its recipe.yaml sets no data.eval_split) and no --data was "
                "given: nothing held out to evaluate on",
                "pass --data FILE (or a folder, or a Hub dataset id) in any format `qtune data` reads, or train "
                "with data.eval_split (e.g. 0.1, or the name of a split every source has)",
            )
    else:
        _check_data_path(data)
        d["data"]["datasets"] = [{"path": data}]
        d["data"]["eval_split"] = None
        d["training"]["eval_steps"] = None
    d["model"]["tokenizer"] = str(run.adapter)
    d["tracking"] = {"backend": "none"}
    d["hub"] = {"push": False}
    return Recipe.model_validate(d)


def _check_data_path(data: str) -> None:
    """--data names a local file or folder, or looks like a Hub dataset id (org/name)."""
    path = Path(data)
    if path.exists():
        return
    if data.count("/") == 1 and not data.startswith((".", "/", "~")) and not path.suffix:
        return  # a Hub dataset id: read (or refused, offline) by datasets like a recipe's source
    raise QtuneError(
        f"--data: {data}: no such file or folder, and not a Hub dataset id (org/name)",
        "give a .jsonl / .json / .csv / .parquet / .txt file, a folder of them, a save_to_disk folder, or a Hub "
        "dataset id",
    )


def _generates(recipe) -> bool:
    from qtune.training import method_of

    return method_of(recipe).generates


def _recipe_for_method(run, recipe, fmt: str, data: str | None):
    """The recipe whose TRL preparation reads this data: SFT's for chats and text, DPO's for preference pairs (its
    tokenization of prompt, chosen and rejected, whatever method trained the run), the reward model's own for a
    reward run. Rows no evaluation here reads are refused."""
    from qtune.config import METHOD_SECTIONS, Recipe

    where = f"--data {data}" if data is not None else f"{run.path}: the eval split"
    if not _generates(run.recipe):
        if fmt != "preference":
            raise QtuneError(
                f"{where}: {fmt} rows, but the run is a reward model (method reward), which scores preference pairs",
                "give preference pairs (prompt + chosen + rejected) with --data",
            )
        return recipe
    if fmt == "unpaired":
        raise QtuneError(
            f"{where}: unpaired rows (prompt / completion / label): qtune eval scores preference pairs, chats, "
            "prompt/completion or text rows",
            "give preference pairs (prompt + chosen + rejected) or chats with --data",
        )
    target = "dpo" if fmt == "preference" else "sft" if fmt in CHAT_SCHEMAS else recipe.method
    if target == recipe.method:
        return recipe
    d = recipe.model_dump()
    if recipe.method in METHOD_SECTIONS:
        d[recipe.method] = None
    d["method"] = target
    if target != "sft":
        d["data"].update(packing=False, train_on="completions")
    return Recipe.model_validate(d)


def _held_out(prepared, data: str | None, tokenized: bool = False):
    """The rows eval scores, as a datasets.Dataset: the split training held out (the same cache entry), or every row
    of --data. `tokenized`: in the form TRL's trainer takes (chats tokenized turn by turn where qtune masks them)."""
    from qtune.data.cache import build_dataset

    p = prepared
    built = build_dataset(p.recipe, p.tokenizer, p.fmt, p.rows, p.args, tokenize=tokenized)
    return built["train" if data is not None else "eval"]


def _data_description(run, data: str | None, fmt: str, held_out) -> dict:
    split = run.recipe.data.eval_split
    return {
        "source": data if data is not None else f"the run's eval split (data.eval_split: {split})",
        "schema": fmt,
        "rows": len(held_out),
    }


def _sample(row: dict, fmt: str) -> dict:
    """A row as a generation prompt and its reference answer: a chat up to its last answer, a prompt and its
    completion, a pair's prompt and chosen answer, or a prompt alone (reference None)."""
    tools = row.get("tools")
    if fmt == "messages":
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return {"prompt": messages[:last], "reference": messages[last].get("content") or None, "tools": tools}
    answer = row.get("completion") if fmt == "prompt_completion" else row.get("chosen")
    if isinstance(answer, list):
        answer = "".join(m.get("content") or "" for m in answer if m["role"] == "assistant")
    return {"prompt": row["prompt"], "reference": answer or None, "tools": tools}


def _load(run, recipe, tokenizer):
    """The run's adapter on ONE base loaded as trained (4-bit, the recipe's dtype and placement). A reward model's
    fresh score head is drawn from training.seed, as training drew it: the base's scores are the run's start."""
    from qtune.model import load_trained, scores

    if scores(recipe):
        from transformers import set_seed

        set_seed(recipe.training.seed)
    model = load_trained(run.recipe, run.adapter)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _batch_size(prepared) -> int:
    """Examples per forward pass: the run's eval batch (training.micro_batch_size, what training held in memory)."""
    args = prepared.args
    return getattr(args, "per_device_eval_batch_size", None) or prepared.recipe.training.micro_batch_size


def _device(model):
    return model.get_input_embeddings().weight.device


# --------------------------------------------------------------------------- loss and pairs


def _sft_loss(prepared, model, dataset, tuned: dict, base: dict | None) -> None:
    """TRL's own evaluation: the run's SFTConfig (its eval batch, max_length, packing, loss masks) and SFTTrainer's
    `evaluate()` on the held-out rows, i.e. the eval_loss training logs; the base's with the adapter disabled."""
    import dataclasses
    import tempfile

    from datasets import DatasetDict
    from transformers import PrinterCallback, ProgressCallback

    from qtune.training import build_trainer

    args = prepared.args
    fields = {f.name for f in dataclasses.fields(args)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    with tempfile.TemporaryDirectory(prefix="qtune-eval-") as tmp:
        view = dataclasses.replace(args, output_dir=tmp, report_to="none", disable_tqdm=True, **{ckpt: False})
        # TRL's trainers require a train split: one held-out row stands in (nothing is trained, it is only tokenized)
        split = DatasetDict(train=dataset.select(range(1)), eval=dataset)
        trainer = build_trainer(dataclasses.replace(prepared, args=view), model, split)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        _loss_figures(trainer.evaluate(), tuned)
        if base is not None:
            with model.disable_adapter():
                _loss_figures(trainer.evaluate(), base)


def _loss_figures(metrics: dict, into: dict) -> None:
    loss = metrics["eval_loss"]
    into["loss"] = loss
    into["perplexity"] = _perplexity(loss)
    if "eval_mean_token_accuracy" in metrics:
        into["token_accuracy"] = metrics["eval_mean_token_accuracy"]


def _perplexity(loss: float) -> float | None:
    return math.exp(loss) if loss < 700 else None  # beyond exp's float range: none to show


def _pair_figures(run, prepared, model, held_out, tuned: dict, base: dict | None, notes: list) -> dict:
    """Preference pairs as TRL prepares them (DPOTrainer's tokenization; RewardTrainer's for a reward run), scored:
    log-probs of the chosen and rejected completions under the tuned model, its reference and the base, or the
    reward model's scores. Returns what the figures mean."""
    from datasets import DatasetDict

    from qtune.data.preparation import prepare_pairs_with_trl

    pairs = prepare_pairs_with_trl(prepared.recipe, prepared.tokenizer, DatasetDict(train=held_out), prepared.args)
    pairs = pairs.pairs
    if not _generates(run.recipe):
        return _reward_model_figures(prepared, model, pairs, tuned, base, notes)
    method, start = run.recipe.method, run.recipe.model.adapter
    batch = _batch_size(prepared)
    logps = _completion_logps(prepared, model, pairs, batch)
    _logp_figures(logps, tuned)
    base_logps = None
    if base is not None or (method in IMPLICIT_REWARD and not start):
        with model.disable_adapter():
            base_logps = _completion_logps(prepared, model, pairs, batch)
    if base is not None:
        _logp_figures(base_logps, base)
    meaning = {
        "loss": "the chosen completions' negative log-likelihood per token (prompt masked, cut at data.max_length)",
        "preference_accuracy": "the chosen completion more likely than the rejected one (summed log-probs)",
    }
    if method not in IMPLICIT_REWARD:
        for figures in (tuned, base):
            if figures is not None:
                figures["reward_accuracy"] = figures["preference_accuracy"]
        meaning["reward_accuracy"] = f"method {method}: the preference accuracy (log-prob of chosen vs rejected)"
        return meaning
    reference = (
        _with_start_adapter(run, model, lambda: _completion_logps(prepared, model, pairs, batch))
        if start
        else base_logps
    )
    beta = getattr(getattr(run.recipe, method), "beta", 1.0)
    margins = [beta * ((c - rc) - (r - rr)) for (c, r, _, _), (rc, rr, _, _) in zip(logps, reference, strict=True)]
    tuned["reward_accuracy"] = sum(m > 0 for m in margins) / len(margins)
    tuned["reward_margin"] = sum(margins) / len(margins)
    what = f"the starting adapter {start} (model.adapter)" if start else "the base (the adapter disabled)"
    meaning["reward_accuracy"] = (
        f"implicit reward beta·(log-prob tuned − log-prob reference), beta {beta:g}, reference {what}: the chosen "
        "completion's above the rejected one's"
    )
    meaning["reward_margin"] = "mean implicit reward of the chosen minus the rejected completion"
    if base is not None and not start:
        notes.append("base: no reward accuracy (the base is the reference: its implicit rewards are all 0)")
    return meaning


def _with_start_adapter(run, model, compute):
    """`compute()` with the run's starting adapter (model.adapter) active instead of its own, loaded beside it."""
    from qtune.model import start_adapter

    model.load_adapter(start_adapter(run.recipe), adapter_name="reference", is_trainable=False)
    model.set_adapter("reference")
    try:
        return compute()
    finally:
        model.set_adapter("default")
        model.delete_adapter("reference")


def _completion_logps(prepared, model, pairs: list, batch: int) -> list[tuple[float, float, int, int]]:
    """Per pair: (log-prob of the chosen completion, of the rejected one, their token counts), batched by TRL's own
    DPO collator (prompt + completion, cut at data.max_length as training cuts, completion mask)."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import selective_log_softmax

    args = prepared.args
    collate = DataCollatorForPreference(
        pad_token_id=prepared.tokenizer.pad_token_id,
        max_length=prepared.recipe.data.max_length,
        truncation_mode=getattr(args, "truncation_mode", "keep_start"),
    )
    device, out = _device(model), []
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            b = collate([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in chunk])
            ids = b["input_ids"].to(device)
            logits = model(input_ids=ids, attention_mask=b["attention_mask"].to(device), use_cache=False).logits
            mask = b["completion_mask"][:, 1:].to(device)
            logps = (selective_log_softmax(logits[:, :-1].float(), ids[:, 1:]) * mask).sum(1).tolist()
            counts = mask.sum(1).tolist()
            k = len(chunk)
            out += list(zip(logps[:k], logps[k:], counts[:k], counts[k:], strict=True))
    return out


def _logp_figures(logps: list, into: dict) -> None:
    tokens = sum(nc for _, _, nc, _ in logps)
    loss = -sum(c for c, _, _, _ in logps) / max(1, tokens)
    into["loss"] = loss
    into["perplexity"] = _perplexity(loss)
    into["preference_accuracy"] = sum(c > r for c, r, _, _ in logps) / len(logps)


def _reward_model_figures(prepared, model, pairs: list, tuned: dict, base: dict | None, notes: list) -> dict:
    """A reward model: each whole sequence (prompt + answer) scored by its head, batched by TRL's RewardTrainer
    collator; pairs longer than data.max_length are left out, as RewardTrainer drops them."""
    import torch
    from trl.trainer.reward_trainer import DataCollatorForPreference

    limit = prepared.recipe.data.max_length
    kept = [(p + c, p + r) for p, c, r in pairs if len(p) + max(len(c), len(r)) <= limit]
    if len(kept) < len(pairs):
        notes.append(f"{len(pairs) - len(kept)} pairs longer than data.max_length {limit} left out (as training)")
    if not kept:
        raise QtuneError(f"every pair is longer than data.max_length {limit}: nothing to score")
    collate = DataCollatorForPreference(pad_token_id=prepared.tokenizer.pad_token_id)
    batch, device = _batch_size(prepared), _device(model)

    def figures(into: dict) -> None:
        margins = []
        with torch.no_grad():
            for i in range(0, len(kept), batch):
                chunk = kept[i : i + batch]
                b = collate([{"chosen_ids": c, "rejected_ids": r} for c, r in chunk])
                logits = model(
                    input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)
                ).logits
                scores = logits[:, 0].float().tolist()
                margins += [c - r for c, r in zip(scores[: len(chunk)], scores[len(chunk) :], strict=True)]
        into["reward_accuracy"] = sum(m > 0 for m in margins) / len(margins)
        into["reward_margin"] = sum(margins) / len(margins)

    figures(tuned)
    if base is not None:
        with model.disable_adapter():
            figures(base)
        notes.append("base: the reward model's start (the base, its score head drawn from training.seed)")
    return {
        "reward_accuracy": "the reward model's score of the chosen sequence above the rejected one's",
        "reward_margin": "mean score of the chosen minus the rejected sequence",
    }


# --------------------------------------------------------------------------- generations


def _stops(run, tokenizer) -> list[int]:
    from qtune.stops import saved_stops

    return saved_stops(run.adapter, tokenizer)


def _stop_description(run, tokenizer) -> list[dict]:
    from qtune.stops import describe

    return describe(tokenizer, _stops(run, tokenizer))


def _prompt_ids(tokenizer, sample: dict) -> list[int]:
    """The prompt as the model sees it: a chat rendered with the run's template and its generation prompt; a text
    prompt tokenized as TRL tokenizes one."""
    prompt = sample["prompt"]
    if isinstance(prompt, list):
        extra = {"tools": sample["tools"]} if sample.get("tools") else {}
        return list(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **extra)[
                "input_ids"
            ]
        )
    return list(tokenizer(prompt)["input_ids"])


def _generations(run, prepared, model, samples, max_new_tokens, base, quiet, tuned, base_figures) -> None:
    """Greedy answers to every sample's prompt, tuned and (with `base`) base, stopping at the run's stop tokens;
    scored against the reference where there is one. Prompts of one token length are batched together, so no prompt
    is padded: each answer is the one a single greedy generation gives."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    tokenizer = prepared.tokenizer
    stops = _stops(run, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad)
    ids = [_prompt_ids(tokenizer, s) for s in samples]
    for sample, prompt in zip(samples, ids, strict=True):
        sample["prompt_text"] = tokenizer.decode(prompt)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(ids):
        by_length.setdefault(len(prompt), []).append(i)
    batch, device = _batch_size(prepared), _device(model)
    sides = ["tuned", "base"] if base else ["tuned"]
    bar = tqdm(total=len(samples) * len(sides), desc="qtune eval: generating", unit="answer", disable=quiet)
    with bar, torch.no_grad():
        for side in sides:
            with model.disable_adapter() if side == "base" else contextlib.nullcontext():
                for length, members in sorted(by_length.items()):
                    for start in range(0, len(members), batch):
                        chunk = members[start : start + batch]
                        inputs = torch.tensor([ids[i] for i in chunk], device=device)
                        out = model.generate(
                            input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config
                        )
                        for i, row in zip(chunk, out[:, length:].tolist(), strict=True):
                            cut = next((k for k, t in enumerate(row) if t in stops), None)
                            answer = row if cut is None else row[:cut]
                            samples[i][side] = tokenizer.decode(answer, skip_special_tokens=True)
                            samples[i][f"{side}_stopped"] = cut is not None
                        bar.update(len(chunk))
    for side, figures in (("tuned", tuned), ("base", base_figures)):
        if figures is not None:
            figures.update(_generation_figures(samples, side))


def exact_match(prediction: str, reference: str) -> bool:
    """The answer, stripped of surrounding whitespace, equals the reference, stripped."""
    return prediction.strip() == reference.strip()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 by Google's rouge-score (its default tokenizer: lower-cased ASCII words and digits)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure


def _generation_figures(samples: list[dict], side: str) -> dict:
    figures = {"stopped": sum(s[f"{side}_stopped"] for s in samples) / len(samples)}
    scored = [s for s in samples if s["reference"] is not None]
    for s in scored:
        s[f"{side}_exact_match"] = exact_match(s[side], s["reference"])
        s[f"{side}_rouge_l"] = rouge_l(s[side], s["reference"])
    if scored:
        figures["exact_match"] = sum(s[f"{side}_exact_match"] for s in scored) / len(scored)
        figures["rouge_l"] = sum(s[f"{side}_rouge_l"] for s in scored) / len(scored)
    return figures


# --------------------------------------------------------------------------- writing eval/


def _quantization(recipe) -> str:
    from qtune.quant import describe

    return describe(recipe)


def library_versions(names: tuple[str, ...]) -> dict:
    """Python's and each named distribution's installed version (None when not installed): what eval.json and
    eval/harness/results.json record."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _generation_records(samples: list[dict]) -> list[dict]:
    keys = ("row", "prompt", "prompt_text", "reference", "tuned", "tuned_stopped", "tuned_exact_match",
            "tuned_rouge_l", "base", "base_stopped", "base_exact_match", "base_rouge_l")  # fmt: skip
    return [{"index": i, **{k: s[k] for k in keys if k in s}} for i, s in enumerate(samples)]


def _write(run, result: dict, log) -> None:
    """RUN_DIR/eval/ staged beside it and renamed into place (the previous eval/ stays whole until then), under the
    run's lock, and recorded in its manifest (an --overwrite of the run sets it aside with the rest)."""
    from qtune.eval_report import render_report
    from qtune.rundir import staged_output

    records = result["generations"]
    figures = {k: v for k, v in result.items() if k != "generations"}
    html = render_report(figures, records)
    target = run.path / "eval"
    with run.lock("eval"):
        with staged_output(target) as stage:
            if (target / "harness").is_dir():  # `qtune eval --tasks` results (qtune.harness) stay as they are
                shutil.copytree(target / "harness", stage / "harness")
            (stage / "eval.json").write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            (stage / "generations.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
            )
            (stage / "report.html").write_text(html, encoding="utf-8")
        run.record_written(target.name)
    log(summary_text(figures))
    log(f"  wrote {target}: eval.json, generations.jsonl ({len(records)} answers), report.html")


def _shown(key: str, value) -> str:
    if value is None:
        return "—"
    kind = next(k for name, _, k in FIGURES if name == key)
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if key == "perplexity":
        return f"{value:,.2f}"
    return f"{value:.4f}"


def figure_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(key, label, base, tuned) for each figure the result holds, in FIGURES order."""
    base = result.get("base") or {}
    tuned = result["tuned"]
    rows = []
    for key, label, _ in FIGURES:
        if key in tuned or key in base:
            rows.append((key, label, _shown(key, base.get(key)) if result.get("base") is not None else "",
                         _shown(key, tuned.get(key))))  # fmt: skip
    return rows


def summary_text(result: dict) -> str:
    """The console summary: what was evaluated, then one line per figure (base, tuned)."""
    data = result["data"]
    with_base = result.get("base") is not None
    lines = [
        f"qtune eval: {result['run_dir']}: {data['rows']} held-out {data['schema']} rows ({data['source']}), "
        f"{result['settings']['samples']} generated answers"
    ]
    lines.append(f"  {'':<22}{'base' if with_base else '':>12}{'tuned':>12}")
    for _, label, base, tuned in figure_rows(result):
        lines.append(f"  {label:<22}{base:>12}{tuned:>12}")
    return "\n".join(lines)
