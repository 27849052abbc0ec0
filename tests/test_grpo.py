"""Online RL (issue #17): method grpo / rloo with reward functions on prompt-only data; the strictly validated
section, the prompt data path, the refusals before any model loads, and a run through `qtune train`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import run_qtune, run_qtune_in_process, write_jsonl
from qtune import training
from qtune.config import GRPO_LOSS_TYPES, load_recipe
from qtune.errors import QtuneError
from qtune.model import Launch

SINGLE = Launch(world_size=1, rank=0, local_rank=0, distributed_type="NO")
REWARDS = [{"name": "accuracy"}]


def _recipe_file(tmp_path, **top) -> str:
    recipe = {"model": {"name": "some/model"}, "data": {"datasets": [{"path": "prompts.jsonl"}]}, **top}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return str(path)


def test_grpo_section_defaults_and_trl_config(tmp_path):
    recipe = load_recipe(
        _recipe_file(
            tmp_path,
            method="grpo",
            grpo={"rewards": [{"name": "accuracy"}, {"name": "length", "target": 5, "weight": 0.5}]},
            training={"micro_batch_size": 8, "grad_accum": 1},
        ),  # fmt: skip
        [f"output_dir={tmp_path / 'g'}", "grpo.beta=0.04", "grpo.loss_type=dr_grpo"],
    )
    assert (recipe.grpo.num_generations, recipe.grpo.temperature, recipe.grpo.samples_every) == (8, 1.0, 10)
    args = training.trainer_config(recipe, SINGLE)
    assert type(args).__name__ == "GRPOConfig"
    assert (args.num_generations, args.beta, args.loss_type, args.reward_weights) == (8, 0.04, "dr_grpo", [1.0, 0.5])
    rloo = load_recipe(_recipe_file(tmp_path, method="rloo", rloo={"rewards": REWARDS}), [f"output_dir={tmp_path}/r"])
    args = training.trainer_config(rloo, SINGLE)
    assert type(args).__name__ == "RLOOConfig" and (args.num_generations, args.beta) == (4, 0.05)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_held_out_prompts_are_evaluated_before_training_at_eval_steps_and_at_the_end(tmp_path, method):
    """data.eval_split with grpo / rloo: TRL's evaluate generates and scores the held-out prompts; qtune asks for it
    before training (eval_on_start) and at training.eval_steps only when set (run_training adds the end), with an eval
    batch of whole groups (micro_batch_size rounded up to a multiple of num_generations)."""
    data = {"datasets": [{"path": "prompts.jsonl"}], "eval_split": 0.1}
    section = {"rewards": REWARDS, "num_generations": 8}
    path = _recipe_file(tmp_path, method=method, data=data, training={"micro_batch_size": 4, "grad_accum": 2},
                        **{method: section})  # fmt: skip
    args = training.trainer_config(load_recipe(path, [f"output_dir={tmp_path / 'o'}"]), SINGLE)
    assert (args.eval_on_start, str(args.eval_strategy.value), args.per_device_eval_batch_size) == (True, "no", 8)
    args = training.trainer_config(load_recipe(path, [f"output_dir={tmp_path / 'o'}", "training.eval_steps=5"]), SINGLE)
    assert (str(args.eval_strategy.value), args.eval_steps, args.eval_on_start) == ("steps", 5, True)
    args = training.trainer_config(load_recipe(path, [f"output_dir={tmp_path / 'o'}", "data.eval_split=null"]), SINGLE)
    assert (args.eval_on_start, str(args.eval_strategy.value)) == (False, "no")


def test_grpo_loss_types_are_trls():
    from trl import GRPOConfig

    help_text = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    offered = set(re.findall(r"'(\w+)'", help_text.split("Supported values are")[1].split(".")[0]))
    assert offered == set(GRPO_LOSS_TYPES)


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"method": "grpo"}, "missing required key 'grpo.rewards'"),
        ({"method": "grpo", "grpo": {"rewards": []}}, "grpo.rewards: List should have at least 1 item"),
        ({"method": "grpo", "grpo": {"rewards": REWARDS, "num_generations": 1}}, "grpo.num_generations"),
        ({"method": "grpo", "grpo": {"rewards": REWARDS, "top_p": 1.5}}, "grpo.top_p"),
        ({"method": "grpo", "grpo": {"rewards": REWARDS, "loss_type": "ppo"}}, "grpo.loss_type"),
        ({"method": "grpo", "grpo": {"rewards": REWARDS, "temprature": 1}}, "unknown key 'grpo.temprature'"),
        ({"method": "rloo", "rloo": {"rewards": REWARDS, "loss_type": "dapo"}}, "unknown key 'rloo.loss_type'"),
        ({"method": "dpo", "grpo": {"rewards": REWARDS}}, "grpo: settings for method grpo, but method is dpo"),
        (
            {"method": "grpo", "grpo": {"rewards": [{"name": "acurracy"}]}},
            "'acurracy' is not a built-in reward (did you mean 'accuracy'?); built-ins: accuracy",
        ),
        (
            {"method": "grpo", "grpo": {"rewards": [{"name": "accuracy", "extract": "first"}]}},
            "r.yaml:9: grpo.rewards.0: reward accuracy: extract must be",
        ),
        (
            {"method": "grpo", "grpo": {"rewards": [{"name": "r.py:f", "scale": 2}]}},
            "options (scale) are for built-ins only",
        ),
        ({"method": "grpo", "grpo": {"rewards": [{"name": "accuracy", "weight": ".nan"}]}}, "weight"),
        (
            {"method": "grpo", "grpo": {"rewards": REWARDS}, "data": {"datasets": [{"path": "p"}], "packing": True}},
            "data: packing: method grpo trains on the completions it generates",
        ),
    ],
)
def test_online_sections_are_strictly_validated(tmp_path, top, message):
    with pytest.raises(QtuneError, match=re.escape(message)):
        load_recipe(_recipe_file(tmp_path, **top))


# --------------------------------------------------------------------------- refusals before any model loads


@pytest.fixture
def grpo_recipe(tmp_path, tiny_llama):
    def make(rows=None, **sections) -> str:
        data = write_jsonl(tmp_path / "prompts.jsonl", rows or [{"prompt": f"the digits {i} 1", "answer": "1"}
                                                                 for i in range(16)])  # fmt: skip
        recipe = {
            "method": "grpo",
            "model": {"name": str(tiny_llama)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"datasets": [{"path": str(data)}], "max_length": 64},
            "training": {"max_steps": 2, "micro_batch_size": 4, "grad_accum": 1, "logging_steps": 1},
            "grpo": {"num_generations": 4, "max_completion_length": 4, "rewards": REWARDS},
            "output_dir": str(tmp_path / "run"),
        }
        for key, value in sections.items():
            recipe[key] = {**recipe[key], **value} if isinstance(recipe.get(key), dict) else value
        path = tmp_path / "grpo.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return str(path)

    return make


def _refused(recipe: str, *expected: str, cwd=None):
    result = run_qtune("train", recipe, cwd=cwd)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error: " in line]  # after a progress bar, maybe
    assert len(lines) == 1, result.stderr[-2000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result


@pytest.mark.parametrize(
    ("source", "name", "expected"),
    [
        (
            "import not_there_xyz\n",
            "rw.py:f",
            [
                "grpo.rewards.0: reward file",
                "rw.py:1 does not import: ModuleNotFoundError: No module named 'not_there_xyz'",
            ],
        ),  # fmt: skip
        ("def g(prompts, completions, **kw):\n    return [0.0]\n", "rw.py:f", ["rw.py has no function 'f'"]),
        ("def f(prompts):\n    return [0.0]\n", "rw.py:f", ["has the wrong signature"]),
    ],
)
def test_bad_reward_references_are_refused_before_the_model_loads(tmp_path, grpo_recipe, source, name, expected):
    (tmp_path / "rw.py").write_text(source)
    recipe = grpo_recipe(grpo={"rewards": [{"name": name}]})
    _refused(recipe, *expected, cwd=tmp_path)
    assert not (tmp_path / "run").exists()


def test_generations_that_do_not_divide_the_batch_name_valid_values(tmp_path, grpo_recipe):
    recipe = grpo_recipe(grpo={"num_generations": 3})
    _refused(recipe, "grpo.num_generations: 3 completions per prompt do not divide the 4 completions",
             "nearest valid num_generations: 2 or 4")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_vllm_asked_but_missing_is_refused_with_the_install_line(tmp_path, grpo_recipe):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    _refused(grpo_recipe(grpo={"use_vllm": True}), "grpo.use_vllm: true but vllm is not installed",
             "pip install 'qtune[vllm]'")  # fmt: skip
    assert not (tmp_path / "run").exists()


def _refused_in_process(recipe: str, *expected: str, command: str = "train", cwd=None) -> str:
    """The CLI in this process: exit 2, one `error:` line holding every expected text, no traceback, no run dir;
    returns the error line (train) or what was shown before it (data)."""
    result = run_qtune_in_process(command, recipe, cwd=cwd)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for text in expected:
        assert text in errors[0], errors[0]
    assert not (Path(recipe).parent / "run").exists()
    return result.stdout if command == "data" else errors[0]


def test_vllm_asked_without_a_gpu_is_refused(tmp_path, grpo_recipe, monkeypatch):
    """vLLM installed (its spec found) on a machine without CUDA: refused before any model loads."""
    import importlib.machinery
    import importlib.util

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    real = importlib.util.find_spec
    fake = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake if name == "vllm" else real(name, *a))
    _refused_in_process(grpo_recipe(grpo={"use_vllm": True}), "grpo.use_vllm: true on a machine without a GPU",
                        "vLLM generates on CUDA GPUs")  # fmt: skip


def test_weights_live_on_each_reward_so_a_separate_list_is_refused(tmp_path, grpo_recipe):
    """A weight per reward entry (grpo.rewards[].weight) cannot disagree in number with the rewards; TRL's own
    reward_weights list, given through training.extra, is refused (it could)."""
    recipe = load_recipe(grpo_recipe(grpo={"rewards": [{"name": "accuracy", "weight": 2}, {"name": "length",
                                                                                           "target": 3}]}))  # fmt: skip
    assert training.trainer_config(recipe, SINGLE).reward_weights == [2.0, 1.0]
    path = grpo_recipe(training={"extra": {"reward_weights": [1.0, 0.5, 0.2]}})
    _refused_in_process(path, "training.extra.reward_weights: already set by the recipe key grpo.rewards[].weight")


def _budget_rows(long: int, short: int = 37) -> list[dict]:
    rows = [{"prompt": f"the digits {i % 10} 1", "answer": "1"} for i in range(short)]
    for k in range(long):
        rows.insert(5 + 3 * k, {"prompt": "the digits " + " ".join(["1"] * 80), "answer": "1"})
    return rows


def test_prompts_longer_than_the_budget_are_counted_and_left_out_below_the_share(tmp_path, grpo_recipe):
    from qtune import pipeline
    from qtune.data.cache import build_dataset

    recipe = grpo_recipe(rows=_budget_rows(1))  # 1 of 38 prompts (2.6%): below data.max_untrained_share 0.05
    shown = run_qtune_in_process("data", recipe, "-n", "1")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "longer than the prompt budget (left out of training): 1 of 38 (2.6%" in shown.stdout, shown.stdout
    assert "prompts.jsonl: row 6 (" in shown.stdout and "columns passed to the reward functions: answer" in shown.stdout
    assert re.search(r"prompt tokens .*: min \d+, p50 \d+, p90 \d+, p99 \d+, max 8\d", shown.stdout), shown.stdout
    prepared = pipeline.prepare(load_recipe(recipe), training=False)
    trained = build_dataset(prepared.recipe, prepared.tokenizer, prepared.fmt, prepared.rows, prepared.args)
    assert len(trained["train"]) == 37 and all(len(r["prompt"]) < 40 for r in trained["train"])


def test_prompts_longer_than_the_budget_above_the_share_are_refused(tmp_path, grpo_recipe):
    recipe = grpo_recipe(rows=_budget_rows(3))  # 3 of 40 (7.5%)
    expected = "data: 3 of 40 prompts (7.5%) are longer than data.max_length 64 tokens, the prompt budget (first: "
    line = _refused_in_process(recipe, expected)
    assert re.search(r"prompts\.jsonl: row (6|9|12) \(82 tokens\)\)", line), line  # one of the long rows, named
    shown = _refused_in_process(recipe, expected, command="data")
    assert "longer than the prompt budget (left out of training): 3 of 40 (7.5%" in shown  # shown before the error


def test_the_vllm_extra_the_refusal_names_exists_and_stays_out_of_dev():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("trl[vllm]") for dep in extras["vllm"])
    assert not any("vllm" in dep for dep in extras["dev"])  # GPU-only: never installed in CI


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
            "row 1: 'messages' ends with a assistant message",
        ),
        ([{"prompt": "hi", "completion": "yo"}], "method grpo generates its completions from prompts"),
    ],
)
def test_data_that_is_not_prompts_is_refused(tmp_path, grpo_recipe, rows, expected):
    _refused(grpo_recipe(rows=rows * 8), expected)


def test_prompt_only_data_for_sft_says_to_use_grpo(tmp_path, make_recipe):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "answer": "1"}] * 4)
    _refused(str(make_recipe(data={"datasets": [{"path": str(data)}]})), "prompts alone (no completion) but method "
             "is sft", "set method: grpo or rloo")  # fmt: skip


def test_prompts_from_messages_ending_with_a_user_turn_keep_their_columns(tmp_path, grpo_recipe):
    from qtune.data.loading import load_rows

    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q {i}"}],
             "answer": str(i), "level": i % 2} for i in range(4)]  # fmt: skip
    recipe = load_recipe(grpo_recipe(rows=rows))
    fmt, got = load_rows(recipe)
    assert fmt == "prompt_only"
    assert sorted(got, key=lambda r: r["answer"])[1] == {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q 1"}],
        "answer": "1",
        "level": 1,
    }


@pytest.mark.parametrize(
    ("prompt", "expected_roles"),
    [
        ("q 1", ["system", "user"]),  # text: becomes a chat, the text as the user turn
        ([{"role": "user", "content": "q 1"}], ["system", "user"]),
        ([{"role": "system", "content": "own"}, {"role": "user", "content": "q 1"}], ["system", "user"]),  # kept
    ],
)
def test_system_prompt_leads_every_prompt(tmp_path, grpo_recipe, prompt, expected_roles):
    from qtune.data.loading import load_rows

    rows = [{"prompt": prompt, "answer": "1"}] * 4
    fmt, got = load_rows(load_recipe(grpo_recipe(rows=rows, grpo={"system_prompt": "think first"})))
    assert fmt == "prompt_only" and [m["role"] for m in got[0]["prompt"]] == expected_roles
    own = isinstance(prompt, list) and prompt[0]["role"] == "system"
    assert got[0]["prompt"][0]["content"] == ("own" if own else "think first") and got[0]["answer"] == "1"
    assert got[0]["prompt"][-1]["content"] == "q 1"


def test_a_reward_that_raises_stops_the_run_with_its_name_step_and_prompt(tmp_path, grpo_recipe):
    """The guard in a real run: one `error:` line naming the reward, the step and the prompt, no TRL traceback."""
    (tmp_path / "rw.py").write_text(
        "def picky(prompts, completions, answer, **kwargs):\n    return [float(int(a)) for a in answer]\n"
    )
    rows = [{"prompt": f"the digits {i} 1", "answer": "x"} for i in range(8)]
    recipe = grpo_recipe(rows=rows, grpo={"rewards": [{"name": "rw.py:picky"}]})
    expected = "reward picky raised ValueError: invalid literal for int() with base 10: 'x' at step 1, prompt 0 ("
    result = run_qtune_in_process("train", recipe, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if "error: " in line]  # after a progress bar
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert expected in errors[0] and re.search(r"prompt 0 \('the digits \d 1'\), completion 0", errors[0]), errors


@pytest.fixture(scope="module")
def digit_task(tmp_path_factory):
    """The learning task shared by the GRPO and RLOO tests: a tiny model SFT'd for 60 steps to answer a prompt with
    one random digit, and 256 prompts whose `answer` column is always 7. Returns (model, SFT run dir, the
    method-independent part of the online recipe)."""
    import random

    from qtune.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("digit-task")
    model = build_tiny_model(folder / "tiny", arch="llama", initializer_range=0.2)
    rng = random.Random(0)
    digits = lambda: "the digits " + " ".join(str(rng.randrange(10)) for _ in range(3))  # noqa: E731
    sft = [{"messages": [{"role": "user", "content": digits()}, {"role": "assistant", "content": str(rng.randrange(10))}]}
           for _ in range(256)]  # fmt: skip
    prompts = [{"prompt": [{"role": "user", "content": digits()}], "answer": "7"} for _ in range(256)]
    training = {"micro_batch_size": 16, "grad_accum": 1, "warmup_ratio": 0.0, "gradient_checkpointing": False}
    base = {
        "model": {"name": str(model)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"datasets": [{"path": str(write_jsonl(folder / "sft.jsonl", sft))}], "max_length": 64},
        "training": {**training, "max_steps": 60, "lr": 1e-2, "logging_steps": 20},
        "output_dir": str(folder / "sft_run"),
    }
    (folder / "sft.yaml").write_text(yaml.safe_dump(base))
    assert run_qtune_in_process("train", folder / "sft.yaml", "--quiet").returncode == 0
    online = {
        **base,
        "model": {"name": str(model), "adapter": str(folder / "sft_run")},
        "data": {
            "datasets": [{"path": str(write_jsonl(folder / "p.jsonl", prompts))}],
            "max_length": 64,
            "eval_split": 0.125,
        },  # fmt: skip
        "training": {**training, "lr": 5e-3, "scheduler": "constant"},
    }
    return folder, online


def _online_run(tmp_path, online: dict, method: str, steps: int, logging_steps: int, section: dict):
    recipe = {**online, "method": method, method: section, "output_dir": str(tmp_path / f"{method}_run")}
    recipe["training"] = {**online["training"], "max_steps": steps, "logging_steps": logging_steps}
    (tmp_path / f"{method}.yaml").write_text(yaml.safe_dump(recipe))
    result = run_qtune_in_process("train", tmp_path / f"{method}.yaml", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [json.loads(line) for line in (tmp_path / f"{method}_run" / "metrics.jsonl").read_text().splitlines()]
    return tmp_path / f"{method}_run", result, logs


REWARDED = [{"name": "accuracy"}, {"name": "length", "target": 2}]


@pytest.mark.slow
def test_grpo_learns_a_rewarded_answer_through_qtune_train(tmp_path, digit_task):
    """GRPO from the SFT adapter (model.adapter), rewarded by accuracy against the answer column (always 7) and a
    length target, lifts the mean accuracy of 32 HELD-OUT prompts (data.eval_split, 8 sampled completions each,
    measured by TRL's evaluate before training and at the end) from chance to near 1 in 30 steps: measured
    0.0625 -> 0.996 (seed 42). Per-reward metrics, the console's reward figures, reward.png and samples.jsonl are
    written."""
    _, online = digit_task
    section = {"num_generations": 8, "max_completion_length": 3, "samples_every": 10, "rewards": REWARDED}
    run_dir, result, logs = _online_run(tmp_path, online, "grpo", 30, 5, section)
    held_out = [(r["step"], r["eval_rewards/accuracy/mean"]) for r in logs if "eval_rewards/accuracy/mean" in r]
    print(f"grpo held-out accuracy (step, mean over 32 prompts x 8 completions): {held_out}")
    assert [step for step, _ in held_out] == [0, 30]  # before training and at the end (no eval_steps: no others)
    (_, before), (_, after) = held_out
    assert before < 0.3 and after >= 0.8 and after - before >= 0.5, held_out
    assert all(k in logs[-1] for k in ("eval_rewards/length/mean", "eval_reward", "eval_completions/mean_length"))
    train_logs = [r for r in logs if "loss" in r]
    assert all(k in train_logs[-1] for k in ("rewards/length/mean", "rewards/accuracy/std", "completions/mean_length"))
    assert all(r["tokens_per_s"] > 0 for r in train_logs)  # TRL counts prompt + generated tokens
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rewards_before"]["eval_rewards/accuracy/mean"] == before
    assert summary["rewards"]["eval_rewards/accuracy/mean"] == after and summary["tokens_per_s"] > 0
    assert f"held-out reward {summary['rewards_before']['eval_reward']:.3f} before training -> " in result.stdout
    assert re.search(r"step 0/30 \| eval loss \S+ \| eval reward [\d.]+ \(accuracy [\d.]+, length [\d.]+\)",
                     result.stdout), result.stdout  # fmt: skip
    assert (run_dir / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "reward.png" in result.stdout
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 10, 20, 30}  # training generations only, not the evaluations'
    assert set(samples[0]["rewards"]) == {"accuracy", "length"}


@pytest.mark.slow
def test_rloo_trains_end_to_end_through_qtune_train(tmp_path, digit_task):
    """method: rloo (TRL's RLOOTrainer, beta 0.05: KL to a frozen copy of the starting adapter) on the same task:
    10 steps lift the held-out accuracy from chance (measured 0.0625 -> 0.996); metrics, KL, samples and the adapter
    (without the reference copy) are written."""
    from safetensors.torch import load_file

    _, online = digit_task
    section = {"num_generations": 8, "max_completion_length": 3, "samples_every": 5, "rewards": REWARDED}
    run_dir, result, logs = _online_run(tmp_path, online, "rloo", 10, 5, section)
    assert "rloo, 8 generations per prompt" in result.stdout and "KL to the starting policy" in result.stdout
    held_out = [(r["step"], r["eval_rewards/accuracy/mean"]) for r in logs if "eval_rewards/accuracy/mean" in r]
    print(f"rloo held-out accuracy: {held_out}")
    assert [step for step, _ in held_out] == [0, 10] and held_out[0][1] < 0.3 and held_out[1][1] >= 0.8, held_out
    train_logs = [r for r in logs if "loss" in r]
    assert [r["step"] for r in train_logs] == [5, 10]
    for key in ("rewards/accuracy/mean", "rewards/length/mean", "reward", "kl", "completions/mean_length"):
        assert all(isinstance(r.get(key), float) for r in train_logs), key
    assert train_logs[-1]["kl"] > 0  # beta > 0: the policy moved away from the reference
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 5, 10}
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert weights and not any(".ref." in k for k in weights)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 10
