"""Bad inputs to the real CLI (`qtune train …`: a few in a subprocess, the rest through qtune.cli.main in-process).

Every one must end in exit code 2 with exactly one `error:` line on stderr (plus at most one `  hint:`
line), no traceback, a message that names what to fix (key path, file and row, YAML line, override),
and an earlier run's output directory left byte for byte as it was, even under --overwrite.
All of them fail before any model weights load, so the whole file runs in about a minute on a CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import run_qtune, run_qtune_in_process, spell_rows

MULTI_PROCESS = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}

# An earlier run's outputs, with known content: no failed command may touch them.
PREVIOUS_RUN = {
    "adapter/adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      earlier weights",
    "adapter/adapter_config.json": b'{"r": 8, "lora_alpha": 16}\n',
    "recipe.yaml": b"# the earlier run's recipe\nlora:\n  r: 8\n",
    "summary.json": b'{"steps": 4}\n',
}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root: file contents, None for a directory."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def line_of(path: Path, text: str) -> int:
    """1-based line of the first line of `path` that contains `text`."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not in {path}")


def the_error(result) -> tuple[str, str]:
    """Check the CLI's failure contract and return (error line, hint line or '')."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, f"exit code {result.returncode}\n{output}"
    assert "Traceback" not in output, output
    lines = result.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, f"want exactly one error: line on stderr, got:\n{result.stderr}"
    rest = lines[starts[0] + 1 :]
    assert rest == [] or (len(rest) == 1 and rest[0].startswith("  hint: ")), result.stderr
    return lines[starts[0]], rest[0] if rest else ""


# --------------------------------------------------------------------------- fixtures


@dataclass
class Ctx:
    make_recipe: Callable[..., Path]
    tmp: Path
    run_dir: Path
    tiny_llama: Path
    odd_models: dict[str, Path]

    def recipe(self, name: str = "recipe.yaml", **sections) -> Path:
        return self.make_recipe(name, output_dir=str(self.run_dir), **sections)

    def data_file(self, name: str, text: str) -> Path:
        path = self.tmp / "data" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def recipe_for_data(self, path: Path) -> Path:
        return self.recipe(data={"datasets": [{"path": str(path)}]})


@pytest.fixture(scope="session")
def odd_models(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """Config-only model folders bitsandbytes 4-bit cannot apply to (no weights needed: the check is on shape)."""
    root = tmp_path_factory.mktemp("odd-models")

    # A causal LM (custom code) made of an embedding only: not one nn.Linear for bitsandbytes to quantize.
    nolinear = root / "no-linear"
    nolinear.mkdir()
    (nolinear / "config.json").write_text(
        json.dumps(
            {
                "model_type": "nolinear",
                "vocab_size": 64,
                "hidden_size": 16,
                "auto_map": {
                    "AutoConfig": "configuration_nolinear.NoLinearConfig",
                    "AutoModelForCausalLM": "modeling_nolinear.NoLinearForCausalLM",
                },
            }
        )
    )
    (nolinear / "configuration_nolinear.py").write_text(
        textwrap.dedent(
            """
            from transformers import PretrainedConfig


            class NoLinearConfig(PretrainedConfig):
                model_type = "nolinear"

                def __init__(self, vocab_size=64, hidden_size=16, **kwargs):
                    self.vocab_size = vocab_size
                    self.hidden_size = hidden_size
                    super().__init__(**kwargs)
            """
        )
    )
    (nolinear / "modeling_nolinear.py").write_text(
        textwrap.dedent(
            """
            import torch
            from transformers import PreTrainedModel

            from .configuration_nolinear import NoLinearConfig


            class NoLinearForCausalLM(PreTrainedModel):
                config_class = NoLinearConfig

                def __init__(self, config):
                    super().__init__(config)
                    self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
                    self.post_init()

                def get_output_embeddings(self):
                    return None

                def forward(self, input_ids=None, **kwargs):
                    return (self.embed(input_ids) @ self.embed.weight.T,)
            """
        )
    )

    # The tiny llama's config, as a GPTQ checkpoint would ship it.
    prequantized = root / "gptq-llama"
    prequantized.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (prequantized / "config.json").write_text(json.dumps(config))

    # An image encoder: no causal-LM head exists for it.
    vit = root / "tiny-vit"
    vit.mkdir()
    (vit / "config.json").write_text(
        json.dumps(
            {
                "model_type": "vit",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            }
        )
    )
    return {"no-linear": nolinear, "gptq": prequantized, "vit": vit}


@pytest.fixture
def ctx(make_recipe, tmp_path, tiny_llama, odd_models) -> Ctx:
    return Ctx(make_recipe, tmp_path, tmp_path / "previous-run", tiny_llama, odd_models)


@pytest.fixture
def previous_run(ctx) -> Path:
    """ctx.run_dir holding an earlier run: adapter, recipe, summary and an empty checkpoints folder."""
    for name, content in PREVIOUS_RUN.items():
        path = ctx.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (ctx.run_dir / "checkpoints").mkdir()
    return ctx.run_dir


# --------------------------------------------------------------------------- the bad inputs


@dataclass
class Bad:
    args: list[str]  # after `qtune train`
    message: list[str]  # all must be in the error line
    hint: list[str] = field(default_factory=list)  # all must be in the hint line
    flags: tuple[str, ...] = ("--overwrite",)  # --overwrite: the refusal is not just "output_dir is not empty"
    env: dict[str, str] = field(default_factory=dict)


def missing_recipe(c: Ctx) -> Bad:
    path = c.tmp / "no-such-recipe.yaml"
    return Bad([str(path)], ["recipe file not found", str(path)], ["recipe"])


def yaml_bad_indent(c: Ctx) -> Bad:
    path = c.recipe()
    path.write_text(path.read_text().replace("  r: 8\n", "  r: 8\n    oops: 1\n"))
    return Bad([str(path)], [f"{path}:{line_of(path, 'oops')}: invalid YAML", "mapping values"], ["indentation"])


def yaml_tab(c: Ctx) -> Bad:
    path = c.recipe()
    path.write_text(path.read_text().replace("  alpha: 16", "\talpha: 16"))
    return Bad([str(path)], [f"{path}:{line_of(path, 'alpha')}: invalid YAML", "'\\t'"])


def yaml_unclosed_quote(c: Ctx) -> Bad:
    path = c.recipe()
    path.write_text(path.read_text().replace("  name: ", '  name: "', 1))
    return Bad([str(path)], [f"{path}:", "invalid YAML", "quoted scalar that starts on line 2"])


def unknown_key(c: Ctx) -> Bad:
    path = c.recipe(lora={"rank": 8})
    return Bad([str(path)], [f"{path}:{line_of(path, 'rank:')}: unknown key 'lora.rank'"], ["did you mean 'lora.r'?"])


def unknown_key_in_dataset(c: Ctx) -> Bad:
    path = c.recipe(data={"datasets": [{"path": str(c.tmp / "train.jsonl"), "fmt": "messages"}]})
    return Bad(
        [str(path)],
        [f"{path}:{line_of(path, 'fmt:')}: unknown key 'data.datasets.0.fmt'"],
        ["did you mean 'data.datasets.0.format'?"],
    )


def unknown_key_override(c: Ctx) -> Bad:
    return Bad(
        [str(c.recipe()), "training.learning_rate=1e-4"],
        ["override 'training.learning_rate=1e-4'", "unknown key 'training.learning_rate'"],
        ["did you mean 'training.lr'?"],
    )


def wrong_type(c: Ctx) -> Bad:
    path = c.recipe(training={"micro_batch_size": "many"})
    line = line_of(path, "micro_batch_size:")
    return Bad([str(path)], [f"{path}:{line}: training.micro_batch_size:", "integer", "'many'"])


def bits_3(c: Ctx) -> Bad:
    path = c.recipe(quantization={"bits": 3})
    return Bad([str(path)], [f"{path}:{line_of(path, 'bits:')}: quantization.bits:", "4 or 8", "got 3"])


def rank_0(c: Ctx) -> Bad:
    path = c.recipe(lora={"r": 0})
    return Bad([str(path)], [f"{path}:{line_of(path, '  r: 0')}: lora.r:", "greater than 0", "got 0"])


def rank_0_override(c: Ctx) -> Bad:
    return Bad([str(c.recipe()), "lora.r=0"], ["override 'lora.r=0'", "lora.r:", "greater than 0"])


def bad_optimizer(c: Ctx) -> Bad:
    return Bad([str(c.recipe(training={"optimizer": "adamw_nope"}))], ["error: training.optimizer:", "adamw_nope"])


def extra_misspelled(c: Ctx) -> Bad:
    return Bad(
        [str(c.recipe(training={"extra": {"warmup_step": 3}}))],
        ["training.extra.warmup_step", "SFTConfig has no argument 'warmup_step'"],
        ["did you mean 'warmup_steps'?", "training.warmup_ratio"],
    )


def extra_misspelled_free(c: Ctx) -> Bad:
    return Bad(
        [str(c.recipe(training={"extra": {"neftune_noise_alfa": 5}}))],
        ["training.extra.neftune_noise_alfa", "SFTConfig has no argument"],
        ["did you mean 'neftune_noise_alpha'?"],
    )


def extra_named_by_schema(c: Ctx) -> Bad:
    return Bad(
        [str(c.recipe(training={"extra": {"learning_rate": 3e-4}}))],
        ["training.extra.learning_rate", "training.lr"],
        ["set training.lr"],
    )


def missing_target_module(c: Ctx) -> Bad:
    return Bad(
        [str(c.recipe(lora={"target_modules": ["q_proj", "query_key_value"]}))],
        ["lora.target_modules", "'query_key_value'", "llama"],
        ["q_proj", "v_proj", "down_proj", "all-linear"],
    )


def data_missing(c: Ctx) -> Bad:
    path = c.tmp / "data" / "nope.jsonl"
    return Bad([str(c.recipe_for_data(path))], ["data.datasets", str(path), "file not found"])


def data_empty(c: Ctx) -> Bad:
    path = c.data_file("empty.jsonl", "\n\n")
    return Bad([str(c.recipe_for_data(path))], ["data.datasets", str(path), "file is empty"])


def _good_lines(n: int) -> list[str]:
    return [json.dumps(row) for row in spell_rows(n)]


def data_invalid_json(c: Ctx) -> Bad:
    lines = _good_lines(5)
    lines[2] = '{"messages": [{"role": "user", "content": "hi"},]}'
    path = c.data_file("bad-json.jsonl", "\n".join(lines) + "\n")
    return Bad([str(c.recipe_for_data(path))], ["data.datasets", str(path), "row 3", "invalid JSON"])


def data_row_without_fields(c: Ctx) -> Bad:
    lines = _good_lines(5)
    lines[2] = json.dumps({"question": "spell 1", "answer": "one"})
    path = c.data_file("no-fields.jsonl", "\n".join(lines) + "\n")
    return Bad([str(c.recipe_for_data(path))], ["data.datasets", str(path), "row 3", "'messages'"])


def data_row_after_blank_line(c: Ctx) -> Bad:
    # A blank line is skipped, but the row number still matches the line an editor shows.
    lines = _good_lines(5)
    lines[1] = ""
    lines[3] = json.dumps({"messages": [{"role": "user", "content": "spell 1"}]})
    path = c.data_file("blank-line.jsonl", "\n".join(lines) + "\n")
    return Bad([str(c.recipe_for_data(path))], [str(path), "row 4", "no assistant message"])


def data_json_array_invalid(c: Ctx) -> Bad:
    rows = [json.dumps(row) for row in spell_rows(3)]
    text = "[\n" + ",\n".join(rows) + ",\n" + '{"messages": [}\n]\n'
    path = c.data_file("rows.json", text)
    return Bad([str(c.recipe_for_data(path))], ["data.datasets", str(path), "line 5", "invalid JSON"])


def no_linear_layers(c: Ctx) -> Bad:
    path = c.recipe(model={"name": str(c.odd_models["no-linear"]), "trust_remote_code": True})
    return Bad(
        [str(path)],
        ["quantization.bits", "'nolinear'", "no nn.Linear"],
        ["quantization.bits: null"],
        flags=("--overwrite", "--check"),
        env={"HF_MODULES_CACHE": str(c.tmp / "hf-modules")},
    )


def already_quantized(c: Ctx) -> Bad:
    path = c.recipe(model={"name": str(c.odd_models["gptq"])})
    return Bad(
        [str(path)],
        ["quantization.bits", "already quantized (gptq)"],
        ["quantization.bits: null"],
        flags=("--overwrite", "--check"),
    )


def not_a_causal_lm(c: Ctx) -> Bad:
    path = c.recipe(model={"name": str(c.odd_models["vit"])})
    return Bad(
        [str(path)],
        ["model.name", "model_type vit", "not a causal language model"],
        flags=("--overwrite", "--check"),
    )


# Launch checks run first: a model and data that do not exist prove nothing loads before them.
def _unloadable(c: Ctx, **sections) -> Path:
    model = {"name": str(c.tmp / "no-such-model"), **sections.pop("model", {})}
    data = {"datasets": [{"path": str(c.tmp / "no-such-data.jsonl")}]}
    return c.recipe(model=model, data=data, **sections)


def device_map_auto_multiprocess(c: Ctx) -> Bad:
    return Bad(
        [str(_unloadable(c, model={"device_map": "auto"}))],
        ["model.device_map", "2 processes"],
        ["drop model.device_map"],
        flags=("--overwrite", "--check"),
        env=MULTI_PROCESS,
    )


def reentrant_checkpointing_ddp(c: Ctx) -> Bad:
    extra = {"gradient_checkpointing_kwargs": {"use_reentrant": True}}
    return Bad(
        [str(_unloadable(c, training={"extra": extra}))],
        ["training.extra.gradient_checkpointing_kwargs.use_reentrant", "DDP"],
        ["remove it"],
        flags=("--overwrite", "--check"),
        env=MULTI_PROCESS,
    )


def find_unused_checkpointing_ddp(c: Ctx) -> Bad:
    return Bad(
        [str(_unloadable(c, training={"extra": {"ddp_find_unused_parameters": True}}))],
        ["training.extra.ddp_find_unused_parameters", "gradient checkpointing under DDP"],
        ["training.gradient_checkpointing: false"],
        flags=("--overwrite", "--check"),
        env=MULTI_PROCESS,
    )


def output_dir_not_empty(c: Ctx) -> Bad:
    return Bad(
        [str(c.recipe())],
        ["output_dir", str(c.run_dir), "already holds an earlier run", "adapter"],
        ["--overwrite", "--resume"],
        flags=(),
    )


def resume_without_checkpoint(c: Ctx) -> Bad:
    return Bad(
        [str(c.recipe()), "training.max_steps=8"],  # more steps than the earlier run's 4: not a finished run
        ["training.resume", "no checkpoint", str(c.run_dir / "checkpoints")],
        ["training.save_steps"],
        flags=("--resume",),
    )


BAD_INPUTS = [
    missing_recipe,
    yaml_bad_indent,
    yaml_tab,
    yaml_unclosed_quote,
    unknown_key,
    unknown_key_in_dataset,
    unknown_key_override,
    wrong_type,
    bits_3,
    rank_0,
    rank_0_override,
    bad_optimizer,
    extra_misspelled,
    extra_misspelled_free,
    extra_named_by_schema,
    missing_target_module,
    data_missing,
    data_empty,
    data_invalid_json,
    data_row_without_fields,
    data_row_after_blank_line,
    data_json_array_invalid,
    no_linear_layers,
    already_quantized,
    not_a_causal_lm,
    device_map_auto_multiprocess,
    reentrant_checkpointing_ddp,
    find_unused_checkpointing_ddp,
    output_dir_not_empty,
    resume_without_checkpoint,
]


# These go through a real `python -m qtune` (the exit path a user sees; trust_remote_code reads HF_MODULES_CACHE
# when transformers is imported; the launcher's variables); the others call qtune.cli.main in-process: the same
# contract, without seconds of interpreter start-up and library imports per case.
REAL_PROCESS = {missing_recipe, yaml_bad_indent, data_invalid_json, no_linear_layers, device_map_auto_multiprocess}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_bad_input_is_refused_and_touches_nothing(case, ctx, previous_run):
    bad = case(ctx)
    before = snapshot(previous_run)
    assert set(before) >= set(PREVIOUS_RUN)

    if case in REAL_PROCESS:
        result = run_qtune("train", *bad.args, *bad.flags, cwd=ctx.tmp, env=bad.env, timeout=300)
    else:
        result = run_qtune_in_process("train", *bad.args, *bad.flags, cwd=ctx.tmp, env=bad.env)

    message, hint = the_error(result)
    for fragment in bad.message:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    for fragment in bad.hint:
        assert fragment in hint, f"{fragment!r} not in hint {hint!r}"
    assert snapshot(previous_run) == before


# --------------------------------------------------------------------------- what must work


def test_help_works_without_importing_torch(tmp_path):
    result = run_qtune("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: qtune" in result.stdout and "train" in result.stdout

    # Help and recipe errors stay instant: none of the heavy libraries is imported for them.
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("model:\n  name: x\nlora:\n  rank: 8\n")
    script = textwrap.dedent(
        """
        import sys
        from qtune.cli import main

        for argv in (["--help"], ["train", "--help"], ["recipe-reference"], ["train", sys.argv[1]]):
            try:
                main(argv)
            except SystemExit as exc:
                print("exit", " ".join(argv), exc.code)
        heavy = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate")
        print("imported", sorted(m for m in heavy if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(bad_recipe)], capture_output=True, text=True, timeout=120)
    assert "exit --help 0" in out.stdout and f"exit train {bad_recipe} 2" in out.stdout, out.stdout + out.stderr
    assert "exit train --help 0" in out.stdout and "usage: qtune train" in out.stdout
    assert "exit recipe-reference 0" in out.stdout
    assert "imported []" in out.stdout, out.stdout
    assert "unknown key 'lora.rank'" in out.stderr


@pytest.mark.parametrize("earlier_run", [False, True], ids=["new-dir", "earlier-run-with-overwrite"])
def test_check_accepts_a_valid_recipe_and_writes_nothing(ctx, earlier_run, request):
    if earlier_run:
        request.getfixturevalue("previous_run")
    before = snapshot(ctx.run_dir) if earlier_run else None
    flags = ["--overwrite"] if earlier_run else []

    # YAML 1.1 reads 2e-4 (no dot) as a string; the CLI must take it, and an override's 1e-2, as numbers
    # (test_config checks the values).
    path = ctx.recipe()
    text = path.read_text()
    assert "lr: 0.001" in text
    path.write_text(text.replace("lr: 0.001", "lr: 2e-4"))

    result = run_qtune("train", "--check", path, "training.weight_decay=1e-2", *flags, cwd=ctx.tmp, timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "is ready: 64 messages rows" in result.stdout
    assert "error:" not in result.stderr and "Traceback" not in result.stderr
    if earlier_run:
        assert snapshot(ctx.run_dir) == before
    else:
        assert not ctx.run_dir.exists()
