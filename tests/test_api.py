"""The Python API (`import qtune`): light to import, the CLI's code paths and errors, a tiny run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import qtune
from conftest import run_qtune_in_process, spell_rows, write_jsonl
from qtune.config import Recipe
from qtune.errors import QtuneError

ROOT = Path(__file__).parent.parent
API = ["QtuneError", "Recipe", "RunDir", "evaluate", "generate", "load_recipe", "merge", "open_run", "train"]


def test_import_qtune_stays_light_and_lists_the_api():
    """`import qtune` (and looking the functions up) imports no torch: `qtune --help` and `accelerate launch qtune`
    import the package too."""
    code = (
        "import sys, qtune\n"
        "light = [m for m in ('torch', 'transformers', 'pydantic') if m in sys.modules]\n"
        "fns = [qtune.load_recipe, qtune.train, qtune.merge, qtune.generate, qtune.open_run]\n"
        "print(light, [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules], sorted(qtune.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == f"[] [] {API}"
    assert sorted(qtune.__all__) == API and set(API) <= set(dir(qtune))
    from qtune import api

    assert sorted(api.__all__) == API, "qtune.__all__ and qtune.api.__all__ must list the same names"
    assert qtune.QtuneError is QtuneError and callable(qtune.train) and callable(qtune.merge)
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        qtune.trian  # noqa: B018


def test_submodules_do_not_shadow_the_functions():
    """Importing a submodule sets an attribute on the package: none may be named like an API function."""
    import qtune.chat
    import qtune.merging
    import qtune.pipeline
    import qtune.training  # noqa: F401

    assert callable(qtune.train) and callable(qtune.merge) and callable(qtune.generate)
    assert not [p.stem for p in (ROOT / "qtune").glob("*.py") if p.stem in API]


def _recipe(tmp_path: Path, model: str = "org/model") -> dict:
    return {
        "model": {"name": model},
        "data": {"datasets": [{"path": tmp_path / "train.jsonl"}], "max_length": 64},  # a Path, as notebooks write
        "output_dir": tmp_path / "run",
    }


def test_load_recipe_from_a_dict_with_overrides(tmp_path):
    data = _recipe(tmp_path)
    recipe = qtune.load_recipe(data, {"training.lr": 1e-4, "lora.target_modules": ["q_proj", "v_proj"]})
    assert (
        isinstance(recipe, Recipe) and recipe.training.lr == 1e-4 and recipe.lora.target_modules == ["q_proj", "v_proj"]
    )
    assert recipe.output_dir == str(tmp_path / "run") and recipe.data.datasets[0].path == str(tmp_path / "train.jsonl")
    assert "training" not in data, "the caller's dict is left as it was"
    # the command line's form, and a Recipe re-validated with more overrides
    assert qtune.load_recipe(data, ["training.lr=3e-4"]).training.lr == 3e-4
    again = qtune.load_recipe(recipe, {"lora.r": 4})
    assert (again.lora.r, again.training.lr, recipe.lora.r) == (4, 1e-4, 16)
    assert qtune.load_recipe(recipe) is recipe


def test_load_recipe_from_a_file_with_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(_recipe(tmp_path), default=str))))
    assert qtune.load_recipe(str(path), {"lora.r": 8}).lora.r == 8
    assert qtune.load_recipe(path, ["lora.r=8"]).lora.r == 8


@pytest.mark.parametrize(
    ("source", "overrides", "message", "hint"),
    [
        ("misspelt", None, "recipe dict: unknown key 'lora.rank'", "did you mean 'lora.r'?"),
        ("ok", {"lora.alpah": 8}, "override 'lora.alpah=8': unknown key 'lora.alpah'", "did you mean 'lora.alpha'?"),
        ("ok", {"training.lr": "fast"}, "override 'training.lr='fast'': training.lr: ", "valid: 0 < training.lr"),
        ("ok", {"data.packing": 1}, "data.packing: must be true or false (got 1)", None),
        ("ok", "lora.r=8", "overrides must be a list of key.sub=value strings or a dict", "{'training.lr': 1e-4"),
        ("ok", {3: 1}, "override key 3 is not a string", "keys are key paths"),
        ("no-output", None, "recipe dict: missing required key 'output_dir'", "The run directory"),
        (42, None, "a recipe is a YAML file's path, a dict or a Recipe, not int", "load_recipe("),
        ("missing.yaml", None, "recipe file not found: missing.yaml", "give the path of a .yaml recipe"),
    ],
)
def test_recipe_errors_are_qtune_errors_with_hints(source, overrides, message, hint, tmp_path):
    if source == "misspelt":
        source = {**_recipe(tmp_path), "lora": {"rank": 8}}
    elif source == "ok":
        source = _recipe(tmp_path)
    elif source == "no-output":
        source = {k: v for k, v in _recipe(tmp_path).items() if k != "output_dir"}
    with pytest.raises(QtuneError) as caught:
        qtune.load_recipe(source, overrides)
    assert message in caught.value.message, caught.value.message
    assert (hint is None and caught.value.hint is None) or hint in (caught.value.hint or ""), caught.value.hint


def test_train_refuses_before_anything_loads(tmp_path):
    """The CLI's checks and QtuneError (no SystemExit): a misspelt key; resume=True against an override."""
    with pytest.raises(QtuneError) as caught:
        qtune.train({**_recipe(tmp_path), "training": {"learning_rate": 1e-4}})
    assert "unknown key 'training.learning_rate'" in caught.value.message and "'training.lr'" in caught.value.hint
    with pytest.raises(QtuneError, match="resume=True contradicts the override training.resume=False"):
        qtune.train(_recipe(tmp_path), {"training.resume": False}, resume=True)
    assert not (tmp_path / "run").exists()


def test_generate_refuses_bad_prompts_before_loading(tmp_path):
    for prompt, message in [
        (None, "prompt: give a text, a conversation"),
        ([], "prompt: give a text"),
        ([{"content": "hi"}], "prompt[0]: a message is a dict with role and content"),
        (["a", [{"role": "user"}]], "prompt[1][0]: a message is a dict with role and content"),
        ([{"role": "system", "content": "s"}], "starts with a system message and system= is given"),
    ]:
        with pytest.raises(QtuneError, match=message.replace("[", r"\[")):
            qtune.generate(tmp_path, prompt, system="be brief")
    with pytest.raises(QtuneError, match="generation settings out of range"):
        qtune.generate(tmp_path, "hi", temperature=-1)
    with pytest.raises(QtuneError, match="a run is a run directory's path or a RunDir"):
        qtune.merge(42)


# ----------------------------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def api_run(tiny_llama, tmp_path_factory):
    """One 4-step training through qtune.train (a dict recipe + overrides), shared by the module's slow tests."""
    root = tmp_path_factory.mktemp("api")
    recipe = {
        "model": {"name": tiny_llama},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"datasets": [{"path": write_jsonl(root / "train.jsonl", spell_rows(32))}], "max_length": 64},
        "training": {"micro_batch_size": 8, "grad_accum": 1, "logging_steps": 2, "gradient_checkpointing": False},
        "output_dir": root / "run",
    }
    run = qtune.train(recipe, {"training.max_steps": 4, "training.lr": 1e-2}, quiet=True)
    return run, recipe


@pytest.mark.slow
def test_train_returns_the_run_with_the_cli_outputs(api_run):
    run, recipe = api_run
    assert isinstance(run, qtune.RunDir) and run.path == Path(recipe["output_dir"])
    assert (run.adapter / "adapter_model.safetensors").is_file() and (run.adapter / "adapter_config.json").is_file()
    assert {"recipe.yaml", "summary.json", "metrics.jsonl", "loss.png", "adapter"} <= {
        p.name for p in run.path.iterdir()
    }
    assert run.summary()["steps"] == 4 and run.recipe.training.lr == 1e-2
    assert [m["step"] for m in run.read_metrics() if "loss" in m] == [2, 4]
    assert qtune.load_recipe(run.recipe_file).training.max_steps == 4  # the resolved recipe, overrides applied
    assert qtune.open_run(run.path).recipe == run.recipe

    # Again without overwrite: the CLI's refusal, as a QtuneError; nothing changed.
    before = (run.adapter / "adapter_model.safetensors").read_bytes()
    with pytest.raises(QtuneError) as caught:
        qtune.train(recipe, {"training.max_steps": 4, "training.lr": 1e-2})
    assert "--overwrite" in str(caught.value) and caught.value.hint
    assert (run.adapter / "adapter_model.safetensors").read_bytes() == before
    # check=True: every check, no training (the run dir is left as it is)
    assert qtune.train(recipe, {"output_dir": str(run.path.parent / "checked")}, check=True) is None
    assert not (run.path.parent / "checked").exists()


@pytest.mark.slow
def test_merge_through_the_api_equals_the_cli_merge(api_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    run, _ = api_run
    merged = qtune.merge(run)
    assert merged == run.merged and (merged / "model.safetensors").is_file()
    result = run_qtune_in_process("merge", run.path, "--out", tmp_path / "cli")
    assert result.returncode == 0, result.stderr[-2000:]
    ours, cli = load_file(merged / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert ours.keys() == cli.keys() and all(torch.equal(ours[k], cli[k]) for k in ours)
    report = json.loads((merged / "qtune_merge.json").read_text())
    assert report == json.loads((tmp_path / "cli" / "qtune_merge.json").read_text()) | {
        "peak_memory_gib": report["peak_memory_gib"],
        "memory_before_load_gib": report["memory_before_load_gib"],
    }
    with pytest.raises(QtuneError, match="not empty"):  # the CLI's refusal: merged/ is there now
        qtune.merge(run.path)


@pytest.mark.slow
def test_generate_answers_as_qtune_chat_does(api_run):
    run, _ = api_run
    answer = qtune.generate(run, "spell 1 2 3 4", max_new_tokens=8)
    assert isinstance(answer, str) and answer.strip()
    result = run_qtune_in_process("chat", run.path, "--prompt", "spell 1 2 3 4", "--max-new-tokens", "8")
    assert result.returncode == 0 and result.stdout.strip() == answer.strip()
    several = qtune.generate(run.path, ["spell 1 2 3 4", [{"role": "user", "content": "spell 5 6"}]], max_new_tokens=8)
    assert isinstance(several, list) and len(several) == 2 and several[0] == answer
    with pytest.raises(QtuneError) as caught:
        qtune.generate(run.path.parent, "hi")  # a folder that is neither a run nor a model
    assert caught.value.hint


@pytest.mark.slow
def test_evaluate_through_the_api_writes_what_qtune_eval_writes(api_run):
    run, recipe = api_run
    data = recipe["data"]["datasets"][0]["path"]
    figures = qtune.evaluate(run, data, n=3, max_new_tokens=6)
    written = json.loads((run.path / "eval" / "eval.json").read_text())
    assert figures["tuned"] == written["tuned"] and len(figures["generations"]) == 3
    assert figures["tuned"]["loss"] > 0 and figures["data"]["rows"] == 32
    with pytest.raises(QtuneError) as caught:  # no eval split, no data: the CLI's refusal, as a QtuneError
        qtune.evaluate(run)
    assert "--data" in str(caught.value) or "--data" in (caught.value.hint or "")
