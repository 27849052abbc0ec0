"""`qtune` command line. Sub-commands parse arguments here and call one plain function each.

No torch import at module level: `qtune --help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from qtune.errors import QtuneError

EXAMPLES = """\
examples:
  qtune train recipes/llama2-qlora.yaml
  qtune train recipes/llama2-qlora.yaml training.lr=1e-4 lora.r=16 output_dir=runs/try2
  accelerate launch qtune train recipes/llama2-qlora.yaml
  accelerate launch --multi_gpu --num_processes 2 qtune train recipes/qwen2.5-7b-qlora.yaml
  qtune recipe-reference          # every recipe key, its type, default and meaning
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qtune",
        description="QLoRA fine-tuning from one YAML recipe: 4-bit base (bitsandbytes), LoRA (peft), TRL trainer.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="fine-tune a model from a recipe",
        description="Fine-tune a model from a recipe. Overrides are key.sub=value, checked like the recipe.",
    )
    train.add_argument("recipe", help="the recipe YAML file")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. training.lr=1e-4")
    group = train.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    group.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in output_dir")
    train.add_argument(
        "--check", action="store_true", help="validate recipe, data, launch and model shape; do not train"
    )
    train.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    sub.add_parser("recipe-reference", help="print every recipe key with its type, default and meaning")
    return parser


def _quiet_libraries() -> None:
    """Silence known-harmless noise from the libraries (kept out of users' logs, errors still show)."""
    import logging
    import warnings

    # bitsandbytes tries to fetch a faster CPU kernel from the hub; offline that only costs a warning.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(args: argparse.Namespace) -> int:
    from qtune import data, model, train
    from qtune.config import load_recipe

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("training.resume=true")
    if args.overwrite:
        overrides.append("training.overwrite=true")
    recipe = load_recipe(args.recipe, overrides)
    launch = model.detect_launch()

    # Everything that can be wrong is checked before the model loads: seconds, not a GPU hour.
    _quiet_libraries()
    train.check_launch(recipe, launch)
    train.prepare_run_dir(recipe, launch)
    fmt, rows = data.load_rows(recipe)
    model.check_architecture(recipe)
    tokenizer = model.load_tokenizer(recipe)
    args_for_trl = train.sft_config(recipe, launch, data.loss_settings(recipe, tokenizer, fmt))
    if args.check:
        if launch.is_main:
            print(f"qtune: {args.recipe} is ready: {len(rows)} {fmt} rows, output in {recipe.output_dir}")
        return 0

    peft_model, tokenizer = model.load(recipe, launch)
    dataset = data.build(recipe, tokenizer, fmt, rows)
    train.run(recipe, peft_model, tokenizer, dataset, args_for_trl, launch)
    return 0


def cmd_recipe_reference(_: argparse.Namespace) -> int:
    from qtune.config import recipe_reference

    print(recipe_reference())
    return 0


COMMANDS = {"train": cmd_train, "recipe-reference": cmd_recipe_reference}


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    # Overrides may come after options (`train r.yaml --resume lora.r=8`): collect them wherever they are.
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if r.startswith("-") or "=" not in r or args.command != "train"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    try:
        code = COMMANDS[args.command](args)
    except QtuneError as exc:
        if args.debug:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `qtune recipe-reference | head`
        sys.exit(0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
