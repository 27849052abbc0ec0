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
  qtune schema > recipe.schema.json   # the recipe's JSON Schema, for editor completion
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
    train.add_argument(
        "--quiet", action="store_true", help="no progress bars: one line per log step (for log files and CI)"
    )
    train.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept a base with .bin/.pt (pickle) weights only: loading a pickle can run code",
    )
    train.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    sub.add_parser("recipe-reference", help="print every recipe key with its type, default and meaning")
    sub.add_parser(
        "schema",
        help="print the recipe's JSON Schema (editor completion and checks; kept in recipes/recipe.schema.json)",
        description="Print the recipe's JSON Schema (draft-07), generated from the same model `train` validates "
        "with: every key's type, default, description and choices; unknown keys are refused. Point a YAML language "
        "server at it (VS Code: the Red Hat YAML extension) with a first line "
        "`# yaml-language-server: $schema=PATH`, or the `yaml.schemas` setting (see the README).",
    )
    data_cmd = sub.add_parser(
        "data",
        help="prepare a recipe's data as training would and show it (stats, masked samples)",
        description="Read, check and tokenize the recipe's data exactly as `train` would (no model weights "
        "load), print rows per source, formats, token lengths, truncation and masking, and rendered samples "
        "with the tokens that carry no loss in [brackets].",
    )
    data_cmd.add_argument("recipe", help="the recipe YAML file")
    data_cmd.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    data_cmd.add_argument("-n", "--samples", type=int, default=3, help="rendered samples to show (default 3)")
    data_cmd.add_argument("--color", action="store_true", help="dim masked tokens instead of [bracketing] them")
    data_cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _eval_parser(sub)
    _export_parsers(sub)
    _gguf_parser(sub)
    _estimate_parser(sub)
    return parser


def quiet_libraries() -> None:
    """Silence known-harmless noise from the libraries (kept out of users' logs, errors still show)."""
    import logging
    import warnings

    # bitsandbytes tries to fetch a faster CPU kernel from the hub; offline that only costs a warning.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _recipe_with_flags(args: argparse.Namespace):
    from qtune.config import load_recipe

    overrides = list(args.overrides)
    if getattr(args, "resume", False):
        overrides.append("training.resume=true")
    if getattr(args, "overwrite", False):
        overrides.append("training.overwrite=true")
    return load_recipe(args.recipe, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """`qtune train RECIPE`: everything checked before the model loads (seconds, not a GPU hour), then trained."""
    from qtune.pipeline import train_recipe

    recipe = _recipe_with_flags(args)
    train_recipe(recipe, check=args.check, quiet=args.quiet, allow_pickle=args.allow_pickle, name=args.recipe)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """`qtune data RECIPE`: the data exactly as `train` prepares it, summarized, before any GPU hour."""
    from qtune import pipeline
    from qtune.data.preparation import check_trainable
    from qtune.data.report import render_summary

    p = pipeline.prepare(_recipe_with_flags(args), training=False)
    print(render_summary(p.recipe, p.tokenizer, p.fmt, p.rows, p.examples, p.loss, max(0, args.samples), args.color))
    check_trainable(p.recipe, p.tokenizer, p.examples)  # after the summary, so the user sees what is wrong
    return 0


def _count(minimum: int):
    """An argparse type: an int of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: give {minimum} or more")
        return value

    return parse


def _eval_parser(sub) -> None:
    from qtune.evaluation import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLES

    p = sub.add_parser(
        "eval",
        help="held-out loss, perplexity, generations (exact match, ROUGE-L), reward accuracy; base vs tuned",
        description="Evaluate a finished run on its eval split (data.eval_split) or --data: held-out loss and "
        "perplexity (TRL's eval loss on the masked labels), greedy answers to N prompts with exact match and ROUGE-L "
        "against the reference answers, and for preference pairs the share where the chosen answer scores above the "
        "rejected one. --base adds the base's figures (the same 4-bit load with the adapter disabled). Writes "
        "RUN_DIR/eval/: eval.json, generations.jsonl and report.html (one self-contained page).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--data", metavar="FILE|HUB_ID", help="evaluate on these rows instead (any format `qtune data` reads)"
    )
    p.add_argument("--base", action="store_true", help="also evaluate the base (the adapter disabled)")
    p.add_argument(
        "-n",
        "--samples",
        type=_count(0),
        default=DEFAULT_SAMPLES,
        metavar="N",
        help=f"prompts to generate answers for (default {DEFAULT_SAMPLES}; all when the data has fewer)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_count(1),
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="K",
        help=f"longest generated answer, in tokens (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    _harness_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar (with --tasks: less output from lm-eval)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def cmd_eval(args: argparse.Namespace) -> int:
    """`qtune eval RUN_DIR`: base vs tuned on held-out data, written to RUN_DIR/eval/."""
    import shlex

    from qtune.evaluation import evaluate_run

    if args.tasks is not None:
        if args.data is not None:
            raise QtuneError(
                "qtune eval: --tasks runs lm-evaluation-harness tasks on their own data; --data is for qtune's figures",
                "run them as two commands: qtune eval RUN_DIR --data FILE, then qtune eval RUN_DIR --tasks NAME",
            )
        return _eval_tasks(args)
    evaluate_run(
        args.run_dir,
        data=args.data,
        base=args.base,
        n=args.samples,
        max_new_tokens=args.max_new_tokens,
        quiet=args.quiet,
        command=shlex.join(["qtune", *args.argv]),
    )
    return 0


def _harness_arguments(p) -> None:
    """`qtune eval`'s lm-evaluation-harness options (lm-eval's own names; qtune/harness.py)."""
    p.add_argument(
        "--tasks",
        metavar="NAME[,NAME]",
        help="lm-eval task, group or tag names, comma-separated (`lm-eval ls tasks` lists them)",
    )
    p.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAML files")
    p.add_argument(
        "--limit", type=float, metavar="N", help="only the first N examples of each task (or a fraction below 1)"
    )
    p.add_argument("--num-fewshot", type=int, metavar="K", help="examples in each prompt (default: the task's own)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="examples per forward pass (default 8)")
    p.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="wrap each prompt in the tokenizer's chat template (for a run trained on chats)",
    )


def _eval_tasks(args: argparse.Namespace) -> int:
    """The --tasks branch of `qtune eval` (qtune/harness.py): results in RUN_DIR/eval/harness/."""
    import shlex

    from qtune.harness import run_tasks

    run_tasks(
        args.run_dir,
        args.tasks,
        limit=args.limit,
        base=args.base,
        quiet=args.quiet,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        apply_chat_template=args.apply_chat_template,
        command=shlex.join(["qtune", *args.argv]),
    )
    return 0


def _estimate_parser(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help="GPU memory a run needs, from the model config alone (no weights downloaded)",
        description="Break down the GPU memory of a QLoRA run: quantized weights (with their constants), "
        "non-quantized parts, LoRA weights, gradients and optimizer state, activations (with and without "
        "checkpointing), logits, CUDA context; the verdict for --gpu, and per GPU under DDP / FSDP for --gpus. "
        "Either a RECIPE (its model and settings; the options below override them) or --model. Exit code 2 when "
        "it does not fit --gpu.",
    )
    p.add_argument("recipe", nargs="?", help="a recipe YAML file (or use --model)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.add_argument("--model", help="hub id from the offline table, a local model folder or a config.json")
    p.add_argument("--bits", type=int, choices=[4, 8, 16], help="4 (NF4), 8 (LLM.int8) or 16 (no quantization)")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit without double quantization")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="load / compute dtype (default bf16)")
    p.add_argument("--micro-batch", type=int, help="examples per GPU per forward pass (default 4)")
    p.add_argument("--max-length", type=int, help="tokens per example (default 2048)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default 16, on all linear layers)")
    p.add_argument("--optimizer", help="transformers optimizer name (default adamw_torch)")
    p.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    p.add_argument(
        "--method",
        choices=["sft", "dpo", "kto", "orpo", "simpo", "grpo", "rloo"],
        help="training method (default: the recipe's, or sft): dpo / orpo / simpo forward chosen + rejected "
        "together, dpo / kto add a frozen reference adapter, grpo / rloo add generation's KV cache and train on "
        "prompt (--max-length) + completion",
    )
    p.add_argument(
        "--max-completion-length",
        type=int,
        help="grpo / rloo: longest generated completion in tokens (default: the recipe's, or 256)",
    )
    p.add_argument("--gpu", help="memory of one GPU, e.g. 24GB (GB read as GiB) for the verdict")
    p.add_argument("--gpus", type=int, help="number of GPUs: per-GPU figures under DDP and FSDP / ZeRO-3")
    p.add_argument("--probe", action="store_true", help="also run one real training step of RECIPE, print its peak")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def cmd_estimate(args: argparse.Namespace) -> int:
    """`qtune estimate`: memory breakdown and verdict before a GPU is rented; --probe measures one step."""
    from qtune import estimate

    if bool(args.recipe) == bool(args.model):
        raise QtuneError(
            "give a RECIPE or --model, one of the two",
            "e.g. qtune estimate --model meta-llama/Llama-2-7b-hf --gpu 24GB",
        )
    if args.probe and not args.recipe:
        raise QtuneError("--probe runs a recipe's training step: give a RECIPE")
    options = dict(
        bits=args.bits,
        double_quant=False if args.no_double_quant else None,
        dtype=args.dtype,
        batch=args.micro_batch,
        length=args.max_length,
        lora_r=args.lora_r,
        optimizer=args.optimizer,
        checkpointing=False if args.no_checkpointing else None,
        gpu=args.gpu,
        gpus=args.gpus,
        method=args.method,
        completion=args.max_completion_length,
    )
    options = {k: v for k, v in options.items() if v is not None}
    if args.bits == 16:
        options["bits"] = None  # no quantization
    if args.recipe:
        recipe = _recipe_with_flags(args)
        result = estimate.from_recipe(recipe, **options)
    else:
        if args.overrides:
            raise QtuneError(f"overrides ({' '.join(args.overrides)}) need a RECIPE", "with --model use the options")
        result = estimate.estimate(args.model, **options)
    print(result.render(), flush=True)
    if args.probe:
        print(estimate.render_probe(estimate.probe(args.recipe, list(args.overrides)), result), flush=True)
    verdict = result.verdict()
    if verdict is not None:
        raise verdict
    return 0


def cmd_recipe_reference(_: argparse.Namespace) -> int:
    from qtune.config import recipe_reference

    print(recipe_reference())
    return 0


def cmd_schema(_: argparse.Namespace) -> int:
    from qtune.config import recipe_json_schema_text

    sys.stdout.write(recipe_json_schema_text())
    return 0


def _export_parsers(sub) -> None:
    """merge / push / chat / quantize (qtune/merging.py, publish.py, chat.py, quantize.py)."""
    debug = {"action": "store_true", "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
    allow_pickle = {"action": "store_true", "help": "accept .bin/.pt (pickle) weights: loading a pickle can run code"}

    p = sub.add_parser(
        "merge",
        help="merge a run's adapter into its base, verify the logits, save safetensors",
        description="Merge RUN_DIR/adapter into its base model and save it (safetensors shards, tokenizer, "
        "generation config) after checking its logits on fixed prompts against the adapter on the base as trained.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", help="output folder (default RUN_DIR/merged); must be new or empty")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32", help="dtype of the merged weights")
    p.add_argument(
        "--onto",
        choices=["dequantized", "original"],
        default="dequantized",
        help="dequantized: the base quantized and dequantized exactly as in training (what the adapter learned "
        "against; default); original: the base's original weights",
    )
    p.add_argument("--base", help="load the base from here instead of recipe.yaml's model.name (same model)")
    p.add_argument(
        "--quantize", type=int, choices=[4, 8], help="re-quantize the merged model with bitsandbytes on save"
    )
    p.add_argument("--prompt", action="append", default=[], help="a verification prompt (repeatable)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    p.add_argument("--allow-pickle", **allow_pickle)
    p.add_argument("--debug", **debug)

    p = sub.add_parser(
        "push",
        help="upload a run's adapter (or merged model) with tokenizer and a model card",
        description="Upload to the Hugging Face Hub. The token comes from HF_TOKEN or `hf auth login`; it is never written.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--repo-id", required=True, help="ORG/NAME")
    p.add_argument("--merged", action="store_true", help="push RUN_DIR/merged instead of the adapter")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=True, help="create it private (default)")
    vis.add_argument("--public", dest="private", action="store_false", help="create it public")
    p.add_argument("--license", default="other", help="license in the model card metadata (default: other)")
    p.add_argument("--dry-run", metavar="DIR", help="stage the files into DIR and upload nothing")
    p.add_argument("--debug", **debug)

    p = sub.add_parser(
        "chat",
        help="chat with a run (adapter on its 4-bit base) or a model; --prompt for one answer",
        description="Chat with RUN_DIR's adapter on its base loaded as in training, RUN_DIR/merged (--merged), or a "
        "model folder. Applies the chat template and streams tokens. Temperature 0 (default) is greedy.",
    )
    p.add_argument("target", metavar="RUN_DIR|MODEL")
    p.add_argument("--prompt", help="answer this one prompt and exit (otherwise an interactive REPL)")
    p.add_argument("--system", help="a system message")
    p.add_argument("--merged", action="store_true", help="use RUN_DIR/merged")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); >0: sampling")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--allow-pickle", **allow_pickle)
    p.add_argument("--debug", **debug)

    p = sub.add_parser(
        "quantize",
        help="quantize a model with bitsandbytes and save it as safetensors (the seed tutorial's flow)",
        description="Load MODEL with a BitsAndBytesConfig, print get_memory_footprint() before and after, save "
        "safetensors + tokenizer to --out, optionally push it.",
    )
    p.add_argument("model", metavar="MODEL", help="local model folder or hub id")
    p.add_argument("--bits", type=int, choices=[4, 8], required=True)
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    p.add_argument("--double-quant", action="store_true", help="quantize the 4-bit constants too")
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="dtype of the unquantized parts (default: the checkpoint's)"
    )
    p.add_argument("--out", required=True, help="output folder; must be new or empty")
    p.add_argument("--push", metavar="ORG/NAME", help="also upload the saved folder to this Hub repo")
    p.add_argument("--public", action="store_true", help="create the pushed repo public (default private)")
    p.add_argument("--allow-pickle", **allow_pickle)
    p.add_argument("--debug", **debug)


def _gguf_parser(sub) -> None:
    p = sub.add_parser(
        "export-gguf",
        help="write a run (merged first) or a merged model as one GGUF file (Llama, Mistral, Qwen2), verified",
        description="Write RUN_DIR (its adapter merged onto the dequantized base first) or MERGED_DIR as one GGUF "
        "file with the gguf package's writer, load it back with transformers' GGUF support (and llama.cpp itself when "
        "llama-cpp-python is installed) and compare token ids and logits with the merged model; the file appears "
        "only when that check passes. Byte-level BPE and sentencepiece-style (byte-fallback) tokenizers.",
    )
    p.add_argument("source", metavar="RUN_DIR|MERGED_DIR")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", dest="qtype", choices=["f16", "q8_0"], default="f16", help="tensor type (default f16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--prompt", action="append", default=[], help="a verification prompt (repeatable)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from qtune import gguf_export

    gguf_export.export_gguf(args.source, args.out, args.qtype, overwrite=args.overwrite, prompts=tuple(args.prompt))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from qtune.merging import merge

    merge(
        args.run_dir,
        out=args.out,
        dtype=args.dtype,
        onto=args.onto,
        base=args.base,
        quantize_bits=args.quantize,
        prompts=tuple(args.prompt),
        max_shard_size=args.max_shard_size,
        allow_pickle=args.allow_pickle,
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from qtune.publish import push

    push(
        args.run_dir, args.repo_id, merged=args.merged, private=args.private, dry_run=args.dry_run, license=args.license
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from qtune import chat

    return chat.chat(
        args.target,
        prompt=args.prompt,
        system=args.system,
        merged=args.merged,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        allow_pickle=args.allow_pickle,
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qtune import publish
    from qtune.quantize import quantize

    if args.push:  # before the work: a bad repo id or a missing token costs seconds
        publish.check_repo_id(args.push)
        token = publish.hub_token()
    quantize(args.model, args.bits, args.out, args.quant_type, args.double_quant, args.dtype, args.allow_pickle)
    if args.push:
        url = publish.upload(Path(args.out), args.push, not args.public, token, f"qtune quantize: {args.bits}-bit")
        print(f"qtune: pushed {args.out} to https://huggingface.co/{args.push} ({url})")
    return 0


COMMANDS = {
    "data": cmd_data,
    "train": cmd_train,
    "recipe-reference": cmd_recipe_reference,
    "schema": cmd_schema,
    "merge": cmd_merge,
    "export-gguf": cmd_export_gguf,
    "push": cmd_push,
    "chat": cmd_chat,
    "quantize": cmd_quantize,
    "estimate": cmd_estimate,
    "eval": cmd_eval,
}


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    # Overrides may come after options (`train r.yaml --resume lora.r=8`): collect them wherever they are.
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    args.argv = argv
    stray = [r for r in rest if r.startswith("-") or "=" not in r or args.command not in ("train", "data", "estimate")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    quiet_libraries()  # before any command imports the libraries it quiets
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
    except OSError as exc:
        import errno

        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or args.debug:
            raise
        where = f" while writing {exc.filename}" if exc.filename else ""
        print(
            f"error: out of disk space{where} ({os.strerror(exc.errno)}); what was complete before is kept",
            file=sys.stderr,
        )
        print(
            "  hint: free some space (or choose an output folder on another disk) and run the command again",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
