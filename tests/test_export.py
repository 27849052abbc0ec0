"""merge (verified numerically), quantize (round trip), chat (greedy is deterministic), push (staged files load)."""

from __future__ import annotations

import io
import json
import os
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_qtune, run_qtune_in_process, spell_rows, write_jsonl
from qtune import merging as qmerge
from qtune import model as qmodel
from qtune import publish, quantize
from qtune.config import load_recipe
from qtune.errors import QtuneError
from qtune.rundir import PICKLE_SUFFIXES

PROMPT = "spell 1 2 3 4"
FAKE_TOKEN = "hf_fakeTokenThatMustNeverBePrinted789"
UNREACHABLE_HUB = {"HF_TOKEN": FAKE_TOKEN, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """One short training shared by the module; lr 1e-2 so lora_B moves enough to make merges differ.

    It runs with hub.push: true, a fake token and a Hub that refuses connections (127.0.0.1:9): training
    finishes and saves the adapter, then the upload fails (test_train_with_hub_push_...)."""
    root = tmp_path_factory.mktemp("export")
    recipe = {
        "model": {"name": str(tiny_llama)},
        "quantization": {"bits": 4, "double_quant": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"datasets": [{"path": str(write_jsonl(root / "train.jsonl", spell_rows(64)))}], "max_length": 64},
        "training": {
            "max_steps": 16,
            "micro_batch_size": 8,
            "grad_accum": 1,
            "lr": 1e-2,
            "logging_steps": 4,
            "gradient_checkpointing": False,
        },
        "hub": {"push": True, "repo_id": "me/tiny-qlora", "private": False},
        "output_dir": str(root / "run"),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_qtune("train", root / "recipe.yaml", env=UNREACHABLE_HUB)
    assert (root / "run" / "adapter" / "adapter_model.safetensors").is_file(), result.stderr[-3000:]
    return root / "run", result


@pytest.fixture(scope="module")
def run_dir(trained) -> Path:
    return trained[0]


@pytest.fixture(scope="module")
def merged(run_dir) -> Path:
    result = run_qtune_in_process("merge", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verified within tolerance" in result.stdout
    return run_dir / "merged"


def _logits(model, tokenizer, text=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0].float()


def qtune_main(capsys, *args) -> tuple[int, str, str]:
    """The CLI in-process (no interpreter start-up): exit code, stdout, stderr."""
    from qtune.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def _no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_merge_onto_dequantized_reproduces_the_adapter_on_the_4bit_base(run_dir, merged, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    report = json.loads((merged / "qtune_merge.json").read_text())
    assert report["onto"] == "dequantized" and report["vs_trained"]["top1"] == 1.0

    # Independently: the adapter on the 4-bit base as trained vs the saved merged model.
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    trained = qmodel.load_trained(recipe, run_dir / "adapter")
    reference = _logits(trained, tokenizer)
    with trained.disable_adapter():
        adapter_effect = (reference - _logits(trained, tokenizer)).abs().max().item()
    merged_model = AutoModelForCausalLM.from_pretrained(merged)
    diff = (_logits(merged_model, tokenizer) - reference).abs().max().item()
    assert adapter_effect > 1e-2, "the adapter should have moved the logits (otherwise the check is vacuous)"
    assert diff < 1e-4 * max(1.0, reference.abs().max().item())

    # --onto original merges onto the unquantized weights: a real gap to what was trained, well above dequantized.
    out = run_dir.parent / "merged-original"
    code, stdout, err = qtune_main(capsys, "merge", run_dir, "--onto", "original", "--dtype", "bf16", "--out", out)
    assert code == 0, err[-3000:]
    original = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in original.parameters()} == {torch.bfloat16}
    gap = (_logits(original, tokenizer) - reference).abs().max().item()
    assert gap > 100 * diff and "ignores the quantization error" in stdout


@pytest.mark.slow
def test_merge_refuses_bad_input_and_writes_nothing(run_dir, tmp_path, capsys):
    from qtune.tiny import build_tiny_model

    no_adapter = tmp_path / "half-run"
    no_adapter.mkdir()
    (no_adapter / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text())
    code, _, err = qtune_main(capsys, "merge", no_adapter)
    assert code == 2 and err.startswith("error: ") and "has no adapter" in err and "  hint: " in err

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, err = qtune_main(capsys, "merge", run_dir, "--out", busy)
    assert code == 2 and "not empty" in err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    other = build_tiny_model(tmp_path / "wider", hidden_size=128, intermediate_size=256)
    code, _, err = qtune_main(capsys, "merge", run_dir, "--base", other, "--out", tmp_path / "m")
    assert code == 2 and "does not fit the base model" in err, err[-2000:]
    assert not (tmp_path / "m").exists() and not _no_leftovers(tmp_path)


@pytest.mark.slow
def test_failed_verification_writes_nothing(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(qmerge.TOLERANCE, "float32", (0.0, 1.0))  # nothing passes a zero tolerance
    with pytest.raises(QtuneError, match="merge verification failed"):
        qmerge.merge(run_dir, out=tmp_path / "m", log=lambda *_: None)
    assert not (tmp_path / "m").exists() and not _no_leftovers(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--bits", "4", "--double-quant"], ["--bits", "8"]])
def test_quantize_round_trip(tiny_llama, tmp_path, args, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "q"
    code, stdout, err = qtune_main(capsys, "quantize", tiny_llama, *args, "--out", out)
    assert code == 0, err[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and not [n for n in names if n.endswith(PICKLE_SUFFIXES)]

    bits, dq = int(args[1]), "--double-quant" in args
    in_memory = quantize.load_quantized(str(tiny_llama), bits, double_quant=dq)
    before = AutoModelForCausalLM.from_pretrained(tiny_llama).get_memory_footprint()
    after = in_memory.get_memory_footprint()
    assert f"float32 model: {before / 2**20:.3f} MiB" in stdout
    assert f"model: {after / 2**20:.3f} MiB (get_memory_footprint)" in stdout and after < before / 2
    constants = quantize.quant_constants_bytes(in_memory)
    assert constants > 0 and f"+{constants / 2**20:.3f} MiB" in stdout

    loaded = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert torch.equal(_logits(loaded, tokenizer), _logits(in_memory, tokenizer))


@pytest.mark.slow
def test_pickle_weights_are_refused_unless_allowed(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(pickled)
    for command in (["quantize", pickled, "--bits", "4", "--out", tmp_path / "q"], ["chat", pickled, "--prompt", "hi"]):
        code, _, err = qtune_main(capsys, *command)
        assert code == 2 and "pickle" in err and "--allow-pickle" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_chat_one_shot_is_greedy_deterministic_and_matches_the_merged_model(run_dir, merged, capsys, monkeypatch):
    first = run_qtune_in_process("chat", run_dir, "--prompt", PROMPT, "--max-new-tokens", "8")
    second = run_qtune_in_process("chat", run_dir, "--prompt", PROMPT, "--max-new-tokens", "8")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.strip() and first.stdout == second.stdout
    code, from_merged, _ = qtune_main(capsys, "chat", run_dir, "--merged", "--prompt", PROMPT, "--max-new-tokens", "8")
    assert code == 0 and from_merged == first.stdout

    # The REPL streams the same answer for the same first turn, then quits on /exit.
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\n/exit\n"))
    code, repl, _ = qtune_main(capsys, "chat", run_dir, "--max-new-tokens", "8")
    assert code == 0 and first.stdout.strip() in repl


@pytest.mark.slow
def test_push_dry_run_stages_a_loadable_adapter_and_card(run_dir, merged, tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    secret = "hf_dontwritemeanywhere123"
    staged = tmp_path / "stage"
    monkeypatch.setenv("HF_TOKEN", secret)
    code, _, err = qtune_main(capsys, "push", run_dir, "--repo-id", "me/tiny-qlora", "--dry-run", staged)
    assert code == 0, err[-3000:]
    names = {p.name for p in staged.iterdir()}
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    card = (staged / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["license"] == "other" and "qlora" in meta["tags"]
    assert "eval loss" in card or "train loss" in card
    assert "AutoPeftModelForCausalLM" in card and "```yaml" in card
    assert all(secret not in p.read_text(errors="ignore") for p in staged.iterdir())

    recipe = load_recipe(run_dir / "recipe.yaml")
    loaded = PeftModel.from_pretrained(qmodel.load_base(recipe).eval(), staged)
    ours = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(state) == len(ours)

    staged_merged = tmp_path / "stage-merged"
    code, _, err = qtune_main(
        capsys, "push", run_dir, "--repo-id", "me/tiny-merged", "--merged", "--dry-run", staged_merged
    )
    assert code == 0, err[-3000:]
    assert yaml.safe_load((staged_merged / "README.md").read_text().split("---")[1])["library_name"] == "transformers"
    AutoModelForCausalLM.from_pretrained(staged_merged)


@pytest.mark.slow
def test_push_errors_are_clear_and_never_leak_the_token(run_dir, tmp_path, capsys, monkeypatch):
    code, _, err = qtune_main(capsys, "push", run_dir, "--repo-id", "not a repo")
    assert code == 2 and "is not ORG/NAME" in err

    no_token = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home")}
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    result = run_qtune("push", run_dir, "--repo-id", "me/tiny", env={**env, **no_token})
    assert result.returncode == 2 and "no Hugging Face token" in result.stderr

    secret = "hf_dontprintme456"
    monkeypatch.setenv("HF_TOKEN", secret)  # conftest sets HF_HUB_OFFLINE=1: the upload cannot reach a hub
    code, out, err = qtune_main(capsys, "push", run_dir, "--repo-id", "me/tiny")
    assert code == 2 and "push to me/tiny failed" in err
    assert secret not in out + err


@pytest.mark.slow
def test_model_card_names_a_hub_base_model(run_dir):
    recipe = load_recipe(run_dir / "recipe.yaml", ["model.name=meta-llama/Llama-2-7b-hf"])
    card = publish.model_card(recipe, "me/x", merged=False, summary={"eval_loss": 1.25}, license="llama2")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "meta-llama/Llama-2-7b-hf" and meta["license"] == "llama2"
    assert "| eval loss | 1.25 |" in card


@pytest.mark.parametrize(
    "settings, env, expected",
    [
        (["hub.repo_id=me/tiny-qlora"], {}, "hub.push: no Hugging Face token"),
        (
            ["hub.repo_id=me/tiny-qlora"],
            {"HF_HUB_OFFLINE": True, "HF_TOKEN": FAKE_TOKEN},
            "hub.push: HF_HUB_OFFLINE=1 is set",
        ),
        (["hub.repo_id=not a repo"], {"HF_TOKEN": FAKE_TOKEN}, "hub.repo_id: 'not a repo' is not ORG/NAME"),
    ],
)
def test_hub_push_is_checked_before_any_model_loads(
    make_recipe, tmp_path, capsys, monkeypatch, settings, env, expected
):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", env.pop("HF_HUB_OFFLINE", False))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, out, err = qtune_main(capsys, "train", make_recipe(), "hub.push=true", *settings)
    assert code == 2 and err.startswith(f"error: {expected}"), err[-2000:]
    assert "  hint: " in err
    assert not (tmp_path / "run").exists() and "run summary" not in out  # refused before the run dir or a model
    assert FAKE_TOKEN not in out + err


@pytest.mark.slow
def test_train_with_hub_push_keeps_the_adapter_when_the_upload_fails(trained, tmp_path, capsys):
    run_dir, result = trained
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"qtune: adapter saved to {run_dir / 'adapter'}" in result.stdout
    error = result.stderr[result.stderr.index("error: ") :]
    assert error.startswith(f"error: training finished and the adapter is saved in {run_dir / 'adapter'}, but push")
    assert "me/tiny-qlora failed" in error
    retry = f"qtune push {shlex.quote(str(run_dir))} --repo-id me/tiny-qlora --public"  # hub.private: false
    assert error.rstrip().endswith(retry)
    assert FAKE_TOKEN not in result.stdout + result.stderr
    assert not [p for p in run_dir.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]

    # The printed command is the real retry: staged with --dry-run it gives the adapter and its card.
    code, _, err = qtune_main(capsys, *shlex.split(retry)[1:], "--dry-run", tmp_path / "stage")
    assert code == 0, err[-2000:]
    assert {"adapter_model.safetensors", "README.md"} <= {p.name for p in (tmp_path / "stage").iterdir()}


# Re-quantized merge vs the unquantized (fp32) merge, max |Δlogit| relative to max |logit|. Measured on this
# module's tiny run: 4-bit NF4 0.092, 8-bit 0.025 (tiny random layers quantize worse than real ones).
REQUANTIZED_TOLERANCE = {4: 0.25, 8: 0.05}


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_merge_requantized_loads_as_bitsandbytes_and_stays_close(run_dir, merged, tmp_path, capsys, bits):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / f"merged-{bits}bit"
    code, stdout, err = qtune_main(capsys, "merge", run_dir, "--quantize", bits, "--out", out)
    assert code == 0, err[-3000:]
    assert "verified within tolerance" in stdout and f"{bits}-bit" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if not n.endswith((".json", ".jinja"))] == ["model.safetensors"], names
    assert json.loads((out / "qtune_merge.json").read_text())["quantized_on_save"] == bits
    assert json.loads((out / "config.json").read_text())["quantization_config"][f"load_in_{bits}bit"] is True
    assert not _no_leftovers(tmp_path)

    model = AutoModelForCausalLM.from_pretrained(out)
    layer = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantized = [name for name, m in model.named_modules() if isinstance(m, layer)]
    assert len(quantized) == 2 * 7, quantized  # 2 decoder layers x q, k, v, o, gate, up, down; lm_head stays
    tokenizer = AutoTokenizer.from_pretrained(out)
    unquantized = _logits(AutoModelForCausalLM.from_pretrained(merged), tokenizer)
    logits = _logits(model, tokenizer)
    relative = ((logits - unquantized).abs().max() / unquantized.abs().max()).item()
    print(f"{bits}-bit re-quantized merge: max |Δlogit| / max |logit| = {relative:.4f}")
    assert 0 < relative <= REQUANTIZED_TOLERANCE[bits]
