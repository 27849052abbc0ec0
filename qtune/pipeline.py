"""One pipeline for every command that trains, or shows what training would see: `prepare`, then `train`.

    qtune train x.yaml → cli.cmd_train ─┬→ train_recipe(recipe): the one implementation of both
    qtune.train(recipe) → api.train ────┘
                                       → prepare(recipe)        everything that can be wrong, before any weight
                                          ├ training.check_launch       loads: launch × placement × quantization
                                          ├ RunDir.check_can_start      refuse / resume / overwrite
                                          ├ training.check_tracking     MLflow: store writable, server answering
                                          ├ data.loading.load_rows      sources → rows of one format
                                          ├ training.check_schema       the rows fit the method (training.METHODS)
                                          ├ data.loading.rows_for_kto   kto: pairs unpaired, both labels present
                                          ├ model.check_architecture    (meta device), model.start_adapter, model.load_tokenizer
                                          ├ data.templates.use_chat_template  the recipe's template, set once, here
                                          ├ training.trainer_config     the method's TRL config (SFTConfig, DPOConfig …)
                                          └ data.preparation.check_training_data  TRL's own preparation of the rows
                                       → train(prepared)
                                          ├ model.load_for_training     4-bit base + k-bit prep + LoRA (fresh or model.adapter)
                                          ├ data.cache.build_dataset    the rows from the cache the check wrote
                                          └ training.run_training       the method's TRL trainer → adapter/ (with the
                                                                        run's stop tokens: qtune.stops), summary.json …

`qtune data` and `qtune estimate --probe` use the same `prepare`; `qtune eval` uses `prepare_eval`, the same steps
for the rows it scores (no launch, run-dir, model-shape or training-data checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qtune.config import ONLINE_METHODS, Recipe
from qtune.model import Launch
from qtune.rundir import RunDir


@dataclass
class PreparedRun:
    """A checked recipe with what training needs before the model loads."""

    recipe: Recipe
    launch: Launch
    run: RunDir
    fmt: str  # the rows' schema: messages, prompt_completion or text (sft); preference (dpo, orpo, simpo); unpaired (kto)
    rows: list  # qtune.data Rows: the mapped rows, with their sources and row labels
    tokenizer: object  # with its pad token and the recipe's chat template set
    loss: dict  # the trainer-config arguments the data decides (which tokens carry loss)
    args: object  # the trainer's config (the method's TRL config: SFTConfig, DPOConfig, KTOConfig …)
    examples: object  # TRL's preparation of (a sample of) the rows, with their statistics
    resume_from: str | None = None  # the checkpoint a resumed run continues from
    allow_pickle: bool = False  # --allow-pickle: a base with pickle weights only may load
    stop_tokens: list[int] = field(default_factory=list)  # the trained end-of-turn, then eos (qtune.stops)


def prepare(
    recipe: Recipe, launch: Launch | None = None, *, training: bool = True, allow_pickle: bool = False
) -> PreparedRun:
    """Check everything that can be checked before any weight loads, in the order that fails fastest.

    training=False (`qtune data`): no launch, run-directory or model-shape checks; every row goes through TRL's
    preparation (not a sample) and the loud data checks are left to the caller, after it has shown the data."""
    from qtune import model
    from qtune.data.loading import load_rows, rows_for_kto
    from qtune.data.preparation import check_training_data, loss_settings
    from qtune.data.report import warn_skipped
    from qtune.data.templates import use_chat_template
    from qtune.stops import stop_tokens
    from qtune.training import check_launch, check_online, check_schema, check_tracking, trainer_config

    launch = launch if launch is not None else model.detect_launch()
    run = RunDir(recipe.output_dir, recipe)
    resume_from = None
    if training:
        check_launch(recipe, launch)
        resume_from = run.check_can_start()
        check_tracking(recipe)  # MLflow: the store writable / the server answering, within seconds
    fmt, rows = load_rows(recipe)
    check_schema(recipe, fmt, rows)
    if recipe.method == "kto":
        fmt, rows = rows_for_kto(recipe, fmt, rows)  # pairs unpaired; one label alone refused
    if recipe.method in ONLINE_METHODS:
        check_online(recipe, launch)  # rewards imported, generations divide the batch, vLLM there
    if training:
        model.check_architecture(recipe)
        model.check_weight_files(recipe.model.name, allow_pickle)
        model.start_adapter(recipe)  # model.adapter: found, safetensors, trained on model.name
    tokenizer = model.load_tokenizer(recipe)
    use_chat_template(recipe, tokenizer)
    loss = loss_settings(recipe, tokenizer, fmt)
    args = trainer_config(recipe, launch, loss)
    if not training:
        warn_skipped(rows)
    examples = check_training_data(
        recipe, tokenizer, fmt, rows, args, **({} if training else {"sample": None, "loud": False})
    )
    if training and launch.is_main:
        warn_skipped(rows)
    stops = stop_tokens(tokenizer, examples.stats["end_of_turn"])
    return PreparedRun(
        recipe, launch, run, fmt, rows, tokenizer, loss, args, examples, resume_from, allow_pickle, stops
    )


def train_recipe(
    recipe: Recipe, *, check: bool = False, quiet: bool = False, allow_pickle: bool = False, name: str | None = None
) -> RunDir | None:
    """`qtune train` and `qtune.train()`, one implementation: every check (`prepare`), then `train`; the run.

    check: stop after the checks and say so (None). A run already finished (training.resume after its last step)
    is said and returned as it is. `name`: the recipe as the user gave it, for the ready line."""
    from qtune.rundir import RunFinished

    try:
        prepared = prepare(recipe, allow_pickle=allow_pickle)
    except RunFinished as done:  # a restarted job (--resume, training.resume: auto) after the last step
        print(f"qtune: {done.message}")
        return RunDir.open(recipe.output_dir)
    if check:
        if prepared.launch.is_main:
            print(
                f"qtune: {name or 'the recipe'} is ready: {len(prepared.rows)} {prepared.fmt} rows, "
                f"output in {prepared.recipe.output_dir}"
            )
        return None
    return train(prepared, quiet=quiet)


def prepare_eval(recipe: Recipe, fmt: str, rows) -> PreparedRun:
    """`qtune eval`: rows already read with `load_rows` (the run's eval split or --data; the caller picks the method
    whose TRL preparation reads them), with the tokenizer (the recipe's chat template set once) and the trainer config
    exactly as `prepare` makes them. None of training's checks: the launch, the run directory, the model's shape and
    TRL's pass over the training rows (eval prepares only the rows it scores)."""
    from qtune import model, training
    from qtune.data.preparation import loss_settings
    from qtune.data.templates import use_chat_template

    launch = model.detect_launch()
    tokenizer = model.load_tokenizer(recipe)
    use_chat_template(recipe, tokenizer)
    loss = loss_settings(recipe, tokenizer, fmt)
    args = training.trainer_config(recipe, launch, loss) if fmt != "prompt_only" else None
    return PreparedRun(recipe, launch, RunDir(recipe.output_dir, recipe), fmt, rows, tokenizer, loss, args, None)


def train(prepared: PreparedRun, quiet: bool = False) -> RunDir:
    """Load the base with a fresh adapter, build the dataset, train with TRL and save: the finished run.

    The main process holds the run dir's lock throughout. With --overwrite the previous run's outputs are set
    aside, not deleted, until the new run has an adapter (its final one or a checkpoint); a failure before that
    puts them back."""
    import contextlib
    import sys

    from qtune import model
    from qtune.data.cache import build_dataset
    from qtune.training import check_free_space, run_training

    p = prepared
    main = p.launch.is_main
    if quiet or not main:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    with p.run.lock("train") if main else contextlib.nullcontext():
        if main:
            recovered = p.run.recover()
            if recovered:
                print(f"qtune: note: {p.run.path}: {recovered}", file=sys.stderr)
            # again, under the lock (another process may have written since prepare()); its notices were shown
            p.resume_from = p.run.check_can_start(notices=False)
        peft_model = model.load_for_training(
            p.recipe, p.launch, p.tokenizer, verbose=False, allow_pickle=p.allow_pickle
        )
        dataset = build_dataset(p.recipe, p.tokenizer, p.fmt, p.rows, p.args)  # main first; others reuse its cache
        check_free_space(p.run.path, peft_model.get_nb_trainable_parameters()[0], p.recipe)
        set_aside = p.run.set_aside_previous() if main and p.recipe.training.overwrite and not p.resume_from else []
        try:
            run = run_training(p, peft_model, dataset, quiet=quiet)
        except BaseException:
            if set_aside and not p.run.has_new_adapter():
                p.run.restore_previous()
                print(f"qtune: the previous run in {p.run.path} was put back (the new one saved no adapter)",
                      file=sys.stderr)  # fmt: skip
            elif set_aside:
                p.run.drop_previous()  # the new run stands: it has a checkpoint to --resume from
            raise
        if set_aside:
            p.run.drop_previous()
    return run
