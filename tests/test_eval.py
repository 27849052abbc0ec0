"""`qtune eval` (qtune/evaluation.py, qtune/eval_report.py): held-out loss against what training logged, the base
with the adapter disabled against a fresh base, generations scored with exact match and ROUGE-L, preference pairs
(log-prob and DPO's implicit reward against TRL's own eval metrics), report.html in a real headless browser, and the
bad inputs (one error line, exit 2, nothing in the run dir changed)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import WORDS, run_qtune_in_process, spell_rows, write_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under FOLDER (eval/ aside) with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != "eval"
    }


def _recipe(root: Path, data: Path, base: Path, **sections) -> Path:
    recipe = {
        "model": {"name": str(base)},
        "quantization": {"bits": 4},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"datasets": [{"path": str(data)}], "max_length": 64, "eval_split": 0.25},
        "training": {
            "max_steps": 16,
            "micro_batch_size": 8,
            "grad_accum": 1,
            "lr": 1e-2,
            "logging_steps": 8,
            "gradient_checkpointing": False,
        },  # fmt: skip
        "output_dir": str(root / "run"),
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def eval_sft_run(tmp_path_factory, tiny_llama) -> Path:
    """A finished 16-step SFT run of the spelling task with a 25% eval split (16 of 64 rows)."""
    root = tmp_path_factory.mktemp("eval-sft")
    recipe = _recipe(root, write_jsonl(root / "train.jsonl", spell_rows(64)), tiny_llama)
    result = run_qtune_in_process("train", recipe, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def evaluated(eval_sft_run):
    """`qtune eval RUN --base -n 6` on the run's own eval split: (run dir, its files before, the CLI's result)."""
    before = _snapshot(eval_sft_run)
    result = run_qtune_in_process("eval", eval_sft_run, "--base", "-n", "6", "--max-new-tokens", "6", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return eval_sft_run, before, result


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest, symlinks=True, ignore=shutil.ignore_patterns("eval"))
    return dest


def _eval_json(run: Path) -> dict:
    return json.loads((run / "eval" / "eval.json").read_text(encoding="utf-8"))


def _generations(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- the figures


@pytest.mark.slow
def test_eval_figures_match_training_and_only_eval_is_added(evaluated):
    from rouge_score import rouge_scorer

    run, before, result = evaluated
    figures = _eval_json(run)
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    tuned, base = figures["tuned"], figures["base"]
    # TRL's own evaluation on the same held-out rows: the eval loss training logged at its end
    assert tuned["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5, abs=1e-6)
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]))
    assert base["loss"] > tuned["loss"] + 0.1, figures  # 16 steps at lr 1e-2 moved it
    assert figures["data"] == {
        "source": "the run's eval split (data.eval_split: 0.25)",
        "schema": "messages",
        "rows": 16,
    }
    assert figures["settings"]["samples"] == 6 and figures["settings"]["max_new_tokens"] == 6
    assert [t["token"] for t in figures["settings"]["stop_tokens"]] == ["<|im_end|>"]
    assert figures["command"] == f"qtune eval {run} --base -n 6 --max-new-tokens 6 --quiet"
    assert figures["versions"]["torch"] and figures["versions"]["rouge-score"]

    answers = _generations(run)
    assert len(answers) == 6
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for a in answers:
        number = a["prompt"][-1]["content"].removeprefix("spell ")
        assert a["reference"] == " ".join(WORDS[int(d)] for d in number.split())  # the held-out row's answer
        assert a["prompt_text"].endswith("<|im_start|> assistant")  # rendered with the generation prompt
        for side in ("tuned", "base"):
            assert a[f"{side}_exact_match"] == (a[side].strip() == a["reference"])
            assert a[f"{side}_rouge_l"] == pytest.approx(scorer.score(a["reference"], a[side])["rougeL"].fmeasure)
    for side, figs in (("tuned", tuned), ("base", base)):
        assert figs["exact_match"] == pytest.approx(sum(a[f"{side}_exact_match"] for a in answers) / 6)
        assert figs["rouge_l"] == pytest.approx(sum(a[f"{side}_rouge_l"] for a in answers) / 6)
        assert figs["stopped"] == pytest.approx(sum(a[f"{side}_stopped"] for a in answers) / 6)
    assert tuned["stopped"] == 1.0  # the adapter learned to end its turn; the random base never does
    assert "exact match" in result.stdout and "wrote" in result.stdout

    after = _snapshot(run)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {".qtune-manifest.json", ".qtune.lock"}, changed
    assert "eval" in json.loads((run / ".qtune-manifest.json").read_text())["written"]  # --overwrite sets it aside
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["eval.json", "generations.jsonl", "report.html"]
    assert not [p for p in run.iterdir() if p.name.startswith(".eval")]  # no staging folder left


@pytest.mark.slow
def test_base_figures_equal_a_fresh_base_load(evaluated):
    """The base's figures come from the one loaded model with the adapter disabled: they equal a second, fresh load
    of the base (wrapped in a new LoRA whose B is zero, which adds exactly nothing, so TRL's trainer takes it)."""
    from peft import LoraConfig, get_peft_model

    from qtune import evaluation, pipeline
    from qtune.data.loading import load_rows
    from qtune.model import load_base
    from qtune.rundir import RunDir

    run_dir, _, _ = evaluated
    run = RunDir.open(run_dir)
    recipe = evaluation._recipe_for_data(run, None)
    fmt, rows = load_rows(recipe)
    prepared = pipeline.prepare_eval(recipe, fmt, rows)
    fresh = get_peft_model(load_base(run.recipe), LoraConfig(r=4, target_modules=["q_proj"])).eval()
    figures: dict = {}
    evaluation._sft_loss(prepared, fresh, evaluation._held_out(prepared, None, tokenized=True), figures, None)
    assert figures["loss"] == pytest.approx(_eval_json(run_dir)["base"]["loss"], abs=1e-5)


def test_scorers():
    from qtune.evaluation import exact_match, rouge_l

    assert rouge_l("four seven two", "four seven two") == 1.0
    assert rouge_l("a c d", "a b c d") == pytest.approx(2 * 1.0 * 0.75 / 1.75)  # LCS 3: precision 1, recall 3/4
    assert rouge_l("", "four") == 0.0
    assert exact_match(" four seven\n", "four seven") and not exact_match("four", "four seven")


@pytest.mark.slow
def test_eval_on_a_data_file_with_fewer_rows_than_n(eval_sft_run, tmp_path):
    """--data in another format (prompt/completion text), -n above its size: every row answered, and said. An
    earlier `qtune eval --tasks` result (eval/harness/) stays as it was."""
    run = _copy(eval_sft_run, tmp_path)
    harness = run / "eval" / "harness" / "results.json"
    harness.parent.mkdir(parents=True, exist_ok=True)
    harness.write_text('{"results": {"task": {"acc,none": 0.5}}}\n')
    rows = [{"prompt": [r["messages"][0]], "completion": [r["messages"][1]]} for r in spell_rows(5, seed=7)]
    data = write_jsonl(tmp_path / "held.jsonl", rows)
    result = run_qtune_in_process("eval", run, "--data", data, "-n", "50", "--max-new-tokens", "3", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "-n 50: the data has 5 prompts; answers were generated for all 5" in result.stderr
    figures = _eval_json(run)
    assert figures["data"] == {"source": str(data), "schema": "prompt_completion", "rows": 5}
    assert figures["settings"]["samples"] == 5 and figures["base"] is None
    assert figures["notes"] == ["-n 50: the data has 5 prompts; answers were generated for all 5"]
    answers = _generations(run)
    assert sorted(a["row"] for a in answers) == [f"{data}: row {i}" for i in range(1, 6)]
    assert all("base" not in a for a in answers)
    assert harness.read_text() == '{"results": {"task": {"acc,none": 0.5}}}\n'


# --------------------------------------------------------------------------- preference pairs


def _pairs(chats: list[dict]) -> list[dict]:
    """Each chat as a pair: its answer chosen, the answer reversed rejected."""
    out = []
    for chat in chats:
        user, answer = chat["messages"]
        wrong = " ".join(reversed(answer["content"].split()))
        wrong = wrong if wrong != answer["content"] else answer["content"] + " zero"
        out.append({"prompt": [user], "chosen": [answer], "rejected": [{"role": "assistant", "content": wrong}]})
    return out


@pytest.mark.slow
def test_pairs_on_an_sft_run_score_the_chosen_answer_as_sft_does(eval_sft_run, tmp_path):
    """Preference pairs on an SFT run: the chosen completions' loss (tokenized by TRL's DPO preparation) equals TRL's
    SFT eval loss on the same conversations, and the reward accuracy is the log-prob comparison."""
    run = _copy(eval_sft_run, tmp_path)
    chats = spell_rows(8, seed=3)  # every answer 4 words + end of turn: per-token and per-batch means agree
    chat_file, pair_file = (
        write_jsonl(tmp_path / "chats.jsonl", chats),
        write_jsonl(tmp_path / "pairs.jsonl", _pairs(chats)),
    )
    result = run_qtune_in_process("eval", run, "--data", chat_file, "-n", "0", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    sft_loss = _eval_json(run)["tuned"]["loss"]
    result = run_qtune_in_process("eval", run, "--data", pair_file, "--base", "-n", "2", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = _eval_json(run)
    assert figures["data"]["schema"] == "preference"
    for side in ("tuned", "base"):
        f = figures[side]
        assert 0.0 <= f["preference_accuracy"] <= 1.0 and f["reward_accuracy"] == f["preference_accuracy"]
    assert figures["tuned"]["loss"] == pytest.approx(sft_loss, rel=1e-4)
    assert "log-prob" in figures["meaning"]["reward_accuracy"]
    assert "qtune eval: generating" in result.stderr  # the progress bar over the prompts
    chosen = {p["prompt"][0]["content"]: p["chosen"][0]["content"] for p in _pairs(chats)}
    answers = _generations(run)
    assert len(answers) == 2 and all(a["reference"] == chosen[a["prompt"][0]["content"]] for a in answers)


@pytest.fixture(scope="module")
def eval_dpo_run(tmp_path_factory, tiny_llama) -> Path:
    root = tmp_path_factory.mktemp("eval-dpo")
    data = write_jsonl(root / "pairs.jsonl", _pairs(spell_rows(32, seed=11)))
    recipe = _recipe(
        root,
        data,
        tiny_llama,
        method="dpo",
        training={"max_steps": 6, "micro_batch_size": 4, "logging_steps": 6, "lr": 5e-3},
    )
    result = run_qtune_in_process("train", recipe, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.mark.slow
def test_dpo_run_reward_accuracy_is_trls_implicit_reward(eval_dpo_run):
    """A DPO run's reward accuracy and margin on its eval split equal TRL's eval_rewards/accuracies and margins of
    the final evaluation (the reference: the base, i.e. the adapter disabled)."""
    result = run_qtune_in_process("eval", eval_dpo_run, "--base", "-n", "2", "--max-new-tokens", "4", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = _eval_json(eval_dpo_run)
    logged = [json.loads(line) for line in (eval_dpo_run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in logged if "eval_rewards/accuracies" in r][-1]
    assert figures["tuned"]["reward_accuracy"] == pytest.approx(final["eval_rewards/accuracies"], abs=1e-6)
    assert figures["tuned"]["reward_margin"] == pytest.approx(final["eval_rewards/margins"], rel=1e-3, abs=1e-5)
    assert "reward_accuracy" not in figures["base"] and "preference_accuracy" in figures["base"]
    assert "implicit reward" in figures["meaning"]["reward_accuracy"]
    assert any("the base is the reference" in n for n in figures["notes"])


@pytest.mark.slow
def test_dpo_run_continued_from_an_adapter_is_measured_against_it(eval_sft_run, tiny_llama, tmp_path):
    """A DPO run that continued the SFT run (model.adapter): its reference is that adapter, loaded beside the trained
    one on the same base; the reward accuracy and margin equal TRL's (whose reference is its frozen copy)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(spell_rows(16, seed=13)))
    training = {"max_steps": 4, "micro_batch_size": 4, "logging_steps": 4, "lr": 5e-3}
    recipe = _recipe(tmp_path, data, tiny_llama, method="dpo", model={"adapter": str(eval_sft_run)}, training=training)
    assert run_qtune_in_process("train", recipe, "--quiet").returncode == 0
    run = tmp_path / "run"
    result = run_qtune_in_process("eval", run, "-n", "0", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = _eval_json(run)
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_rewards" in line][
        -1
    ]
    assert figures["tuned"]["reward_accuracy"] == pytest.approx(final["eval_rewards/accuracies"], abs=1e-6)
    assert figures["tuned"]["reward_margin"] == pytest.approx(final["eval_rewards/margins"], rel=1e-3, abs=1e-5)
    assert f"the starting adapter {eval_sft_run}" in figures["meaning"]["reward_accuracy"]


@pytest.mark.slow
def test_reward_run_scores_are_trls_eval_accuracy(tiny_llama, tmp_path):
    """A reward model's accuracy and margin on its eval split equal RewardTrainer's eval_accuracy and eval_margin; the
    base is its start (the score head drawn from training.seed); chats are refused (a reward model scores pairs)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(spell_rows(32, seed=11)))
    training = {"max_steps": 8, "micro_batch_size": 4, "logging_steps": 8}
    recipe = _recipe(tmp_path, data, tiny_llama, method="reward", training=training)
    assert run_qtune_in_process("train", recipe, "--quiet").returncode == 0
    run = tmp_path / "run"
    result = run_qtune_in_process("eval", run, "--base", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = _eval_json(run)
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line][
        -1
    ]
    assert figures["tuned"]["reward_accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-6)
    assert figures["tuned"]["reward_margin"] == pytest.approx(final["eval_margin"], rel=1e-3, abs=1e-5)
    assert set(figures["base"]) == {"reward_accuracy", "reward_margin"} and figures["settings"]["samples"] == 0
    chats = write_jsonl(tmp_path / "chats.jsonl", spell_rows(4))
    _refused(run_qtune_in_process("eval", run, "--data", chats), "reward model", "preference pairs")


# --------------------------------------------------------------------------- report.html in a browser


CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const img = document.querySelector("img");
  const out = document.createElement("div");
  out.id = "qtune-check";
  out.dataset.rows = document.querySelectorAll("table.samples tbody tr").length;
  out.dataset.figures = document.querySelectorAll("table.figures tbody tr").length;
  out.dataset.image = img ? (img.complete ? img.naturalWidth + "x" + img.naturalHeight : "incomplete") : "none";
  document.body.appendChild(out);
});
</script></body>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test.sh installs Debian's chromium)")
def test_report_renders_in_a_headless_browser(evaluated, tmp_path):
    """report.html in Debian's chromium: the samples table has its rows, the inline chart decodes (naturalWidth > 0),
    and a screenshot of the page shows the chart's colours."""
    from PIL import Image

    run, _, _ = evaluated
    page = (run / "eval" / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page and page.count("</body>") == 1
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))  # no file/URL
    assert not re.search(r'(href|src)="(https?:|file:)', page)

    probe = tmp_path / "probe.html"  # a copy with a script that writes what the browser sees into the page
    probe.write_text(page.replace("</body>", CHECK_SCRIPT), encoding="utf-8")
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'id="qtune-check" data-rows="(\d+)" data-figures="(\d+)" data-image="([^"]*)"', dom.stdout)
    assert found, (dom.stdout[-2000:], dom.stderr[-2000:])
    rows, figure_rows, image = int(found[1]), int(found[2]), found[3]
    assert rows == 6 and figure_rows >= 6, found.group(0)
    width, height = (int(x) for x in image.split("x"))
    assert width > 0 and height > 0, image

    shot = tmp_path / "report.png"
    done = _chromium(
        tmp_path, "--window-size=1280,1600", f"--screenshot={shot}", (run / "eval" / "report.html").as_uri()
    )
    assert shot.is_file(), done.stderr[-2000:]
    pixels = Image.open(shot).convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20)
    painted = sum(count for count, rgb in colours if rgb != (255, 255, 255)) / (pixels.width * pixels.height)
    assert painted > 0.03, painted  # text, tables and the chart: not a blank page
    assert any(abs(r - 0x2F) < 8 and abs(g - 0x6F) < 8 and abs(b - 0xDF) < 8 for _, (r, g, b) in colours)  # tuned bars


def test_report_escapes_the_text_it_shows():
    from qtune.eval_report import render_report

    nasty = '<script>alert("x")</script> & <b>bold</b>'
    result = {
        "run_dir": "runs/<x>",
        "command": "qtune eval 'runs/<x>'",
        "model": {"base": "m", "adapter": "a", "method": "sft", "quantization": "4-bit"},
        "data": {"source": nasty, "schema": "messages", "rows": 1},
        "tuned": {"exact_match": 1.0, "loss": 0.5},
        "base": {"exact_match": 0.0, "loss": 2.0},
        "meaning": {"loss": nasty},
        "notes": [nasty],
        "versions": {"torch": "2"},
    }
    records = [{"index": 0, "prompt": [{"role": "user", "content": nasty}], "reference": nasty, "tuned": nasty,
                "tuned_exact_match": True, "base": nasty, "base_exact_match": False}]  # fmt: skip
    page = render_report(result, records)
    assert "<script" not in page and "<b>bold" not in page and "runs/<x>" not in page
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;") >= 6
    assert '<td class="ok">' in page and '<td class="miss">' in page and "data:image/png;base64," in page


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def fake_run(tmp_path, tiny_llama) -> Path:
    """A run directory's files without trained weights (nothing here loads a model): recipe.yaml without an eval
    split, an adapter folder."""
    data = write_jsonl(tmp_path / "train.jsonl", spell_rows(8))
    recipe = yaml.safe_load(_recipe(tmp_path, data, tiny_llama).read_text())
    del recipe["data"]["eval_split"]
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return run


def _refused(result, *parts: str) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = _errors(result)
    assert len(errors) == 1, result.stderr
    for part in parts:
        assert part in errors[0], errors[0]
    assert "  hint: " in result.stderr
    return errors[0]


def test_a_folder_that_is_not_a_run_is_refused_saying_what_a_run_holds(tmp_path):
    folder = tmp_path / "somewhere"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    _refused(run_qtune_in_process("eval", folder), "not a qtune run directory", "recipe.yaml", "adapter/")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    _refused(run_qtune_in_process("eval", tmp_path / "missing"), "no such run directory")


def test_no_eval_split_and_no_data_names_both(fake_run):
    before = _snapshot(fake_run)
    _refused(run_qtune_in_process("eval", fake_run), "no eval split", "data.eval_split", "--data")
    assert _snapshot(fake_run) == before and not (fake_run / "eval").exists()


def test_data_that_eval_cannot_read_is_refused(fake_run, tmp_path):
    _refused(run_qtune_in_process("eval", fake_run, "--data", tmp_path / "nope.jsonl"), "--data", "no such file")
    unpaired = [{"prompt": "spell 1", "completion": "one", "label": True}, {"prompt": "spell 2", "completion": "x", "label": False}]  # fmt: skip
    result = run_qtune_in_process("eval", fake_run, "--data", write_jsonl(tmp_path / "u.jsonl", unpaired))
    _refused(result, "unpaired rows")
    assert not (fake_run / "eval").exists()
    assert run_qtune_in_process("eval", fake_run, "-n", "-1").returncode == 2  # argparse: 0 or more
    recipe = yaml.safe_load((fake_run / "recipe.yaml").read_text())
    recipe["data"].update(eval_split=0.25, datasets=[{"path": str(tmp_path / "moved.jsonl")}])
    (fake_run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_qtune_in_process("eval", fake_run)
    _refused(result, "moved.jsonl")
    assert "reads the run's data sources" in result.stderr and "pass --data" in result.stderr
