"""Reward functions for grpo / rloo (issue #17): the built-ins, user functions by reference, and the guard that
turns a misbehaving reward into one error naming it, the step and the prompt."""

from __future__ import annotations

import math
import re
import types

import pytest

from qtune import rewards
from qtune.errors import QtuneError

# --------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    ("options", "completion", "answer", "expected"),
    [
        ({}, "so the answer is 42.", "42", 1.0),
        ({}, "3 apples and then 1,000.50", "1000.5", 1.0),
        ({}, "it is 41", "42", 0.0),
        ({}, "no number here", "42", 0.0),
        ({}, "-7", -7, 1.0),  # the column may hold numbers
        ({"extract": "boxed"}, r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}", 1.0),
        ({"extract": "boxed"}, "the answer is 12", "12", 0.0),
        ({"extract": "regex", "pattern": r"<answer>(.*?)</answer>"}, "<answer> 7 </answer>", "7", 1.0),
        ({"extract": "regex", "pattern": r"#### (\S+)"}, "a #### 1 then #### 2", "2", 1.0),  # the last match
        ({"extract": "whole"}, "  paris \n", "paris", 1.0),
        ({"column": "solution"}, "x = 5", "5", 1.0),
        # the reference read from the column: GSM8K's answers are worked solutions ending "#### 72"
        ({"reference": "last_number"}, "so 1000 in all", "She pays 10 x 100 = 1,000\n#### 1,000", 1.0),
        ({"reference": "regex", "reference_pattern": r"####\s*(.+)"}, "<x>72", "24 x 3 = 72\n#### 72", 1.0),
        ({"reference": "regex", "reference_pattern": r"####\s*(.+)"}, "72", "no marker 72", 0.0),  # unreadable: 0
        ({}, "72", "24 x 3 = 72\n#### 72", 0.0),  # reference whole (default): the column is the bare answer
    ],
)
def test_accuracy_extracts_the_final_answer(options, completion, answer, expected):
    fn = rewards.resolve("accuracy", options)
    column = options.get("column", "answer")
    assert fn(["p"], [completion], **{column: [answer]}) == [expected]


def test_accuracy_reads_conversational_completions():
    fn = rewards.resolve("accuracy")
    completions = [[{"role": "assistant", "content": "it is 9"}], [{"role": "assistant", "content": "8"}]]
    assert fn(["a", "b"], completions, answer=["9", "9"]) == [1.0, 0.0]


def test_accuracy_without_its_column_names_the_columns():
    fn = rewards.resolve("accuracy")
    with pytest.raises(KeyError, match="no column 'answer' in the data \\(columns: solution\\)"):
        fn(["p"], ["1"], solution=["1"], trainer_state=None)


def test_format_reward_matches_the_whole_completion():
    fn = rewards.resolve("format", {"pattern": r"<think>.*</think>\s*<answer>.*</answer>"})
    good = "<think>a\nb</think>\n<answer>3</answer>\n"
    assert fn(["p"] * 3, [good, "<answer>3</answer>", good + " extra"]) == [1.0, 0.0, 0.0]


def test_length_reward_peaks_at_the_target():
    words = rewards.resolve("length", {"target": 4, "unit": "words"})
    assert words(["p"] * 4, ["a b c d", "a b", "a b c d e f g h", ""]) == [1.0, 0.5, 0.0, 0.0]
    tokens = rewards.resolve("length", {"target": 2})
    assert tokens(["p"] * 2, ["x", "y"], completion_ids=[[1, 2], [1, 2, 3]]) == [1.0, 0.5]
    chars = rewards.resolve("length", {"target": 10, "unit": "chars"})
    assert chars(["p"], ["12345"]) == [0.5]


def test_builtins_carry_their_recipe_name():
    assert [rewards.resolve(n, o).__name__ for n, o in [("accuracy", {}), ("length", {"target": 3})]] == [
        "accuracy",
        "length",
    ]


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("acurracy", {}, "'acurracy' is not a built-in reward (did you mean 'accuracy'?); built-ins: accuracy"),
        ("bleu", {}, "'bleu' is not a built-in reward; built-ins: accuracy (column?, extract?, pattern?, reference?"),
        ("accuracy", {"colum": "a"}, "reward accuracy has no option 'colum' (did you mean 'column'?)"),
        ("accuracy", {"extract": "first"}, "extract must be last_number, boxed, regex or whole"),
        ("accuracy", {"extract": "regex"}, "extract regex needs a pattern"),
        ("accuracy", {"pattern": "x"}, "pattern applies to extract regex only"),
        ("accuracy", {"reference": "regex"}, "reference regex needs a reference_pattern"),
        ("accuracy", {"reference_pattern": "x"}, "reference_pattern applies to reference regex only"),
        ("accuracy", {"reference": "first"}, "reference must be whole, last_number, boxed or regex"),
        ("accuracy", {"reference": "regex", "reference_pattern": "(x"}, "reference_pattern is not a valid regex"),
        ("format", {}, "reward format needs the option 'pattern'"),
        ("format", {"pattern": "(unclosed"}, "reward format: pattern is not a valid regex"),
        ("length", {"target": 0}, "target must be a whole number > 0"),
        ("length", {"target": "5"}, "target must be a whole number"),
        ("length", {"target": 5, "unit": "lines"}, "unit must be tokens, words or chars"),
    ],
)
def test_bad_builtin_entries_are_one_line_each(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        rewards.resolve(name, options)


# --------------------------------------------------------------------------- user functions by reference


def test_a_file_reference_loads_the_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, **kwargs):\n    return [-len(c) / 100 for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    fn = rewards.resolve("my_rewards.py:brevity")
    assert fn(["p"], ["abcd"]) == [-0.04]
    assert rewards.resolve(f"{tmp_path}/my_rewards.py:brevity")(["p"], ["ab"]) == [-0.02]


def test_a_module_reference_loads_the_function(tmp_path, monkeypatch):
    package = tmp_path / "rewardpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scores.py").write_text("def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.resolve("rewardpkg.scores:one")(["p", "q"], ["a", "b"]) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("source", "reference", "message"),
    [
        (
            "import not_a_module_xyz\n",
            "r.py:f",
            r"reward file .*r\.py:1 does not import: ModuleNotFoundError: No module",
        ),
        ("x = 1\ny = (\n", "r.py:f", r"reward file .*r\.py:2 does not import: SyntaxError: '\(' was never closed"),
        ("x = 1\nraise RuntimeError('boom')\n", "r.py:f", r"r\.py:2 does not import: RuntimeError: boom"),
        ("def fn(prompts, completions, **kw):\n    return []\n", "r.py:f", r"r\.py has no function 'f'.*functions: fn"),
        ("def reward(prompts, completions, **kw):\n    return []\n", "r.py:rewad", r"did you mean 'reward'\?"),
        ("f = 3\n", "r.py:f", "'f' is a int, not a function"),
        ("def f(prompts, completions):\n    return []\n", "r.py:f", r"wrong signature .* no \*\*kwargs"),
        ("def f(completions):\n    return []\n", "r.py:f", r"wrong signature .*: it takes no prompts; it has no"),
        ("", "missing.py:f", r"reward file missing\.py not found"),
        ("", "no_such_pkg_xyz.mod:f", r"reward module no_such_pkg_xyz\.mod not found"),
        ("", "r.py", "'r.py' is not a built-in reward"),  # no colon: read as a built-in's name
        ("", "r.py:", "is not path/to/file.py:function or package.module:function"),
    ],
)
def test_bad_references_say_what_and_where(tmp_path, monkeypatch, source, reference, message):
    (tmp_path / "r.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        rewards.resolve(reference)


def test_a_user_function_may_name_data_columns(tmp_path, monkeypatch):
    (tmp_path / "r.py").write_text("def f(prompts, completions, answer, **kw):\n    return [1.0] * len(answer)\n")
    monkeypatch.chdir(tmp_path)
    assert rewards.resolve("r.py:f")(["p"], ["c"], answer=["a"], completion_ids=[[1]]) == [1.0]


def test_a_user_function_takes_no_options(tmp_path, monkeypatch):
    (tmp_path / "r.py").write_text("def f(prompts, completions, **kw):\n    return []\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="options \\(scale\\) are for built-ins only"):
        rewards.resolve("r.py:f", {"scale": 2})


# --------------------------------------------------------------------------- the guard


def _state(step: int):
    return types.SimpleNamespace(global_step=step)


def test_the_guard_passes_good_values_through_as_floats():
    import numpy as np

    fn = rewards.guarded("ok", lambda prompts, completions, **kw: [1, np.float32(0.5)], num_generations=2)
    assert fn(["p", "p"], ["a", "b"], trainer_state=_state(0)) == [1.0, 0.5]
    assert fn.__name__ == "ok"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, None, 0.0, 1.0], "reward r returned None at step 4, prompt 0 ('what is 1'), completion 1"),
        ([1.0, 0.0, math.nan, 1.0], "reward r returned nan at step 4, prompt 1 ('what is 2'), completion 2"),
        ([1.0, 0.0, 0.0, math.inf], "reward r returned inf at step 4, prompt 1"),
        ([1.0, "1", 0.0, 1.0], "reward r returned str '1' at step 4, prompt 0"),
        ([1.0, 0.0, 1.0], "reward r returned 3 value(s) for 4 completions at step 4"),
        (5.0, "reward r returned float, not a list of numbers, at step 4"),
    ],
)
def test_the_guard_stops_on_bad_values_with_name_step_and_prompt(values, message):
    fn = rewards.guarded("r", lambda prompts, completions, **kw: values, num_generations=2)
    prompts = ["what is 1", "what is 1", "what is 2", "what is 2"]
    with pytest.raises(QtuneError, match=re.escape(message)):
        fn(prompts, ["a", "b", "c", "d"], trainer_state=_state(3))


def test_the_guard_names_the_completion_a_raising_reward_fails_on():
    def picky(prompts, completions, answer, **kw):
        return [float(int(a)) for a in answer]

    fn = rewards.guarded("picky", picky, num_generations=2)
    with pytest.raises(QtuneError) as err:
        fn(["p0", "p0", "p1", "p1"], ["a"] * 4, answer=["1", "1", "x", "x"], trainer_state=_state(0))
    assert err.value.message == (
        "reward picky raised ValueError: invalid literal for int() with base 10: 'x' at step 1, prompt 1 ('p1'), "
        "completion 2"
    )
