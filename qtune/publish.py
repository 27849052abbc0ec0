"""Publish a run to the Hugging Face Hub: `qtune push` and `hub.push` after training. The adapter (or merged
model) with its tokenizer, the resolved recipe (secrets redacted) and a model card; the token is held in memory
only. `push --dry-run DIR` stages the exact files and uploads nothing."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from qtune.config import ONLINE_METHODS, Recipe
from qtune.errors import QtuneError
from qtune.rundir import PICKLE_SUFFIXES, RunDir, check_no_pickle_files, check_output_dir, staged_output

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_repo_id(repo_id: str | None, key: str = "--repo-id") -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not repo_id or not REPO_ID.match(repo_id):
        raise QtuneError(f"{key}: '{repo_id}' is not ORG/NAME", "e.g. my-user/llama2-7b-qlora-alpaca")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise QtuneError(f"{key}: '{repo_id}' is not a valid Hub repo id: {str(exc).splitlines()[0]}") from None
    return repo_id


def hub_token() -> str:
    """The token from HF_TOKEN or the stored `hf auth login`; held in memory only, never written or logged."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise QtuneError("no Hugging Face token: set HF_TOKEN or run `hf auth login`", "a token with write access")
    return token


def check_push_after_training(repo_id: str | None, run_dir: str = "RUN_DIR") -> None:
    """`hub.push: true`, before any model loads: the repo id parses, the Hub is not switched off, a token is set."""
    import shlex

    from huggingface_hub import get_token, is_offline_mode

    check_repo_id(repo_id, key="hub.repo_id")
    later = f"set hub.push: false and run `qtune push {shlex.quote(str(run_dir))} --repo-id {repo_id}` after training"
    if is_offline_mode():
        raise QtuneError(
            "hub.push: HF_HUB_OFFLINE=1 is set, so the adapter could not be uploaded after training",
            f"unset HF_HUB_OFFLINE, or {later}",
        )
    if not get_token():
        raise QtuneError(
            "hub.push: no Hugging Face token to upload with after training",
            f"set HF_TOKEN or run `hf auth login` (a token with write access), or {later}",
        )


def push_after_training(run_dir: Path, repo_id: str, private: bool, log=print) -> str:
    """The end of `train` with hub.push: upload the saved adapter; a failed upload leaves it saved and says
    the exact `qtune push` command that retries it."""
    import shlex

    try:
        return push(run_dir, repo_id, private=private, log=log)
    except QtuneError as exc:
        retry = f"qtune push {shlex.quote(str(run_dir))} --repo-id {repo_id}" + ("" if private else " --public")
        raise QtuneError(
            f"training finished and the adapter is saved in {Path(run_dir) / 'adapter'}, but {exc.message}",
            (f"{exc.hint}; " if exc.hint else "") + f"then retry the upload with: {retry}",
        ) from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP client raises when the Hub cannot be reached (connection refused, timeout)."""

    errors: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        with contextlib.suppress(ImportError):
            errors.append(__import__(name).HTTPError)
    return tuple(errors)


def _hub_id(name: str) -> str | None:
    """`name` if it looks like a Hub repo id rather than a local path."""
    if Path(name).exists() or not REPO_ID.match(name):
        return None
    return name


METHOD_NAMES = {
    "sft": "supervised fine-tuning (SFT)",
    "dpo": "Direct Preference Optimization (DPO)",
    "kto": "Kahneman-Tversky Optimization (KTO)",
    "orpo": "Odds Ratio Preference Optimization (ORPO)",
    "simpo": "Simple Preference Optimization (SimPO)",
    "grpo": "Group Relative Policy Optimization (GRPO)",
    "rloo": "REINFORCE Leave-One-Out (RLOO)",
}
PROMPT_DATA = "prompts (the completions are generated during training; the other columns go to the reward functions)"
SFT_DATA = "chats, prompt / completion pairs or plain text"


def method_section(recipe: Recipe) -> list[str]:
    """The model card's "Training method" lines: the method, its TRL trainer and settings (as passed to TRL), the
    reference model, and the data (its kind and sources)."""
    from qtune.training import PREFERENCE_DATA, method_of

    method = method_of(recipe)
    trainer = method.trainer.rpartition(".")[2]
    name = METHOD_NAMES.get(recipe.method, recipe.method)
    lines = [f"- **method**: `{recipe.method}`, {name}, trained with TRL's `{trainer}`"]
    settings = method.settings(recipe)
    if settings:
        shown = ", ".join(f"`{k}`: {v}" for k, v in settings.items() if v is not None)
        lines.append(f"- **settings** (`{recipe.method}:` section of the recipe, as given to TRL): {shown}")
    online = recipe.method in ONLINE_METHODS
    if online:
        section = getattr(recipe, recipe.method)
        lines.append(
            "- **rewards** (summed with their weights): " + "; ".join(_reward_text(r) for r in section.rewards)
        )
        reference = (
            f"the starting policy, frozen (KL penalty beta {section.beta:g}): "
            + (f"a copy of the starting adapter `{recipe.model.adapter}`" if recipe.model.adapter
               else "the base model (the adapter switched off)")
            if section.beta
            else "none (beta 0: no KL penalty)"
        )  # fmt: skip
        lines.append(f"- **reference model**: {reference}")
    elif method.reference:
        reference = (
            f"the starting adapter `{recipe.model.adapter}`, frozen"
            if recipe.model.adapter
            else "the base model (the starting policy), frozen"
        )
        lines.append(f"- **reference model**: {reference}")
    elif recipe.method != "sft":
        lines.append("- **reference model**: none (this method needs none)")
    if recipe.model.adapter and not method.reference:
        lines.append(f"- **started from**: adapter `{recipe.model.adapter}`")
    kind = SFT_DATA if recipe.method == "sft" else PROMPT_DATA if online else PREFERENCE_DATA[method.schemas[0]]
    if recipe.method == "kto":
        kind += ", or preference pairs split into one desirable and one undesirable row"
    lines.append(f"- **data**: {kind}, max_length {recipe.data.max_length} tokens, from:")
    for source in recipe.data.datasets:
        hub = _hub_id(source.path)
        where = f"[{hub}](https://huggingface.co/datasets/{hub})" if hub else f"`{source.path}` (a local file)"
        details = [f"format {source.format}"]
        if source.split != "train":
            details.append(f"split {source.split}")
        if source.columns:
            details.append("columns " + ", ".join(f"{k} ← {v}" for k, v in source.columns.items()))
        lines.append(f"  - {where} ({'; '.join(details)})")
    return lines


def _reward_text(entry) -> str:
    """One reward of the recipe as the model card names it: `name` (weight w; its options)."""
    options = ", ".join(f"{k}: {v}" for k, v in entry.options.items())
    return f"`{entry.name}` (weight {entry.weight:g}" + (f"; {options})" if options else ")")


def _reward_figures(summary: dict | None) -> list[str]:
    """grpo / rloo: the held-out mean reward before training and at the end (total and per function), and the last
    training step's, as model-card table rows."""
    before, after = ((summary or {}).get(k) or {} for k in ("rewards_before", "rewards"))
    rows = []
    for label, record, key in (
        ("held-out reward before training", before, "eval_reward"),
        ("held-out reward (final)", after, "eval_reward"),
        ("reward (last train step)", after, "reward"),
    ):
        if isinstance(record.get(key), (int, float)):
            rows.append(f"| {label} | {record[key]:.4g} |")
    from qtune.rewards import reward_means

    for when, record in (("before training", before), ("final", after)):
        for name, value in reward_means(record, "eval_").items():
            rows.append(f"| held-out {name} (mean, {when}) | {value:.4g} |")
    return rows


def model_card(recipe: Recipe, repo_id: str, merged: bool, summary: dict | None, license: str = "other") -> str:
    """README.md with YAML metadata (base_model, library_name, tags, datasets, license) and a usage snippet."""
    import yaml
    from huggingface_hub import ModelCardData

    from qtune.config import recipe_to_dict
    from qtune.quant import describe as describe_quantization

    base = recipe.model.name
    base_id = _hub_id(base)
    datasets = [d for d in (_hub_id(s.path) for s in recipe.data.datasets) if d]
    data = ModelCardData(
        base_model=base_id,
        library_name="transformers" if merged else "peft",
        tags=["qtune", "qlora", "lora", recipe.method, "trl", "peft"] + (["merged"] if merged else []),
        license=license,
        datasets=datasets or None,
        pipeline_tag="text-generation",
    )
    quant = describe_quantization(recipe)
    figures = []
    for key, label in [
        ("steps", "steps"),
        ("train_loss", "train loss"),
        ("eval_loss", "eval loss"),
        ("rewards/accuracies", "reward accuracy (last train step)"),
        ("rewards/margins", "reward margin (last train step)"),
        ("eval_rewards/accuracies", "eval reward accuracy"),
        ("eval_rewards/margins", "eval reward margin"),
        ("wall_time_s", "wall time (s)"),
        ("world_size", "processes"),
    ]:
        value = (summary or {}).get(key, ((summary or {}).get("rewards") or {}).get(key))
        if value is not None:
            figures.append(f"| {label} | {value:.4g} |" if isinstance(value, float) else f"| {label} | {value} |")
        if key == "eval_loss" and recipe.method in ONLINE_METHODS:
            figures += _reward_figures(summary)
    if merged:
        usage = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")'
        )
    else:
        usage = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  # loads the base, then the adapter\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")'
        )
    kind = "merged model (LoRA adapter folded into the base weights)" if merged else "LoRA adapter"
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{base}` (a local model)"
    sources = ", ".join(f"`{s.path}`" for s in recipe.data.datasets)
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {kind} fine-tuned with [qtune](https://github.com/) (QLoRA: {quant} base, LoRA r={recipe.lora.r}, "
        f"alpha={recipe.lora.alpha:g}) from {base_text} on {sources}, by {METHOD_NAMES.get(recipe.method, recipe.method)}.",
        "",
        "## Training method",
        "",
        *method_section(recipe),
        "",
        "## Training figures",
        "",
        *(["| figure | value |", "|---|---|", *figures] if figures else ["No summary.json was found for this run."]),
        "",
        "## Usage",
        "",
        "```python",
        usage,
        "```",
        "",
        "## Recipe",
        "",
        "The resolved recipe this was trained with (`qtune train recipe.yaml` repeats the run):",
        "",
        "```yaml",
        yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def stage_push(run_dir: str | os.PathLike, repo_id: str, merged: bool, into: Path, license: str = "other") -> Path:
    """Copy the files to upload (adapter or merged model, tokenizer, README.md) into the empty folder `into`."""
    run = RunDir.open(run_dir)
    source = run.require_merged() if merged else run.adapter
    summary = run.summary()
    for item in source.iterdir():
        if item.name.endswith(PICKLE_SUFFIXES) or item.name == "README.md":
            continue  # peft's placeholder card is replaced by ours
        if item.is_file():
            shutil.copy2(item, into / item.name)
    shutil.copy2(run.recipe_file, into / "qtune_recipe.yaml")  # secrets were redacted when it was written
    (into / "README.md").write_text(model_card(run.recipe, repo_id, merged, summary, license), encoding="utf-8")
    check_no_pickle_files(into)
    return into


def upload(folder: Path, repo_id: str, private: bool, token: str, message: str) -> str:
    """HfApi.create_repo + upload_folder; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError, *_network_errors()) as exc:
        text = (str(exc).replace(token, "<token>").strip() or type(exc).__name__).splitlines()[0][:300]
        raise QtuneError(
            f"push to {repo_id} failed: {text}", "check the token's write access and the network"
        ) from None
    return str(getattr(info, "commit_url", info))


def push(
    run_dir: str | os.PathLike,
    repo_id: str,
    merged: bool = False,
    private: bool = True,
    dry_run: str | os.PathLike | None = None,
    license: str = "other",
    log=print,
) -> Path | str:
    """Upload the adapter (or merged model) with tokenizer and model card; with dry_run, stage only. The run dir
    is held (its lock) while its files are staged, so no `train --overwrite` or `merge` changes them halfway."""
    check_repo_id(repo_id)
    with RunDir.open(run_dir).lock("push"):
        return _push_locked(run_dir, repo_id, merged, private, dry_run, license, log)


def _push_locked(run_dir, repo_id: str, merged: bool, private: bool, dry_run, license: str, log) -> Path | str:
    if dry_run is not None:
        dest = Path(dry_run)
        check_output_dir(dest)
        with staged_output(dest) as folder:
            stage_push(run_dir, repo_id, merged, folder, license)
        log(
            f"qtune: dry run: files for {repo_id} staged in {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}"
        )
        return dest
    token = hub_token()
    with tempfile.TemporaryDirectory(prefix="qtune-push-") as tmp:
        stage_push(run_dir, repo_id, merged, Path(tmp), license)
        url = upload(Path(tmp), repo_id, private, token, f"qtune: {'merged model' if merged else 'LoRA adapter'}")
    log(f"qtune: pushed {'merged model' if merged else 'adapter'} to https://huggingface.co/{repo_id} ({url})")
    return url
