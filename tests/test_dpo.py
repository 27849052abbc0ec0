"""Preference tuning (issue #16), DPO first: the method key and its section, preference data, starting from an
adapter with the reference as the starting policy, and a DPO run that learns a rule."""

from __future__ import annotations

import re

import pytest
import yaml

from qtune import train
from qtune.config import DPO_LOSS_TYPES, load_recipe
from qtune.errors import QtuneError
from qtune.model import Launch

SINGLE = Launch(world_size=1, rank=0, local_rank=0, distributed_type="NO")


def _recipe_file(tmp_path, **top) -> str:
    recipe = {"model": {"name": "some/model"}, "data": {"datasets": [{"path": "pairs.jsonl"}]}, **top}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- (a) the method key and its section


def test_method_defaults_to_sft_without_a_dpo_section(tmp_path):
    recipe = load_recipe(_recipe_file(tmp_path))
    assert recipe.method == "sft" and recipe.dpo is None


def test_dpo_section_gets_its_defaults(tmp_path):
    recipe = load_recipe(_recipe_file(tmp_path, method="dpo"))
    assert recipe.dpo.beta == 0.1 and recipe.dpo.loss_type == "sigmoid"


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo", "reward"])
def test_planned_methods_are_refused_as_not_yet(tmp_path, method):
    with pytest.raises(QtuneError, match=f"method: {method} is not yet supported"):
        load_recipe(_recipe_file(tmp_path, method=method))


def test_unknown_method_lists_the_methods(tmp_path):
    with pytest.raises(QtuneError, match="method: Input should be 'sft', 'dpo'"):
        load_recipe(_recipe_file(tmp_path, method="ppo"))


def test_a_section_for_another_method_is_an_error_that_says_so(tmp_path):
    with pytest.raises(QtuneError) as err:
        load_recipe(_recipe_file(tmp_path, dpo={"beta": 0.2}))
    assert "r.yaml:" in err.value.message and "dpo: settings for method dpo, but method is sft" in err.value.message


@pytest.mark.parametrize(
    ("dpo", "message"),
    [
        ({"beta": 0}, "dpo.beta: Input should be greater than 0"),
        ({"betta": 0.1}, "unknown key 'dpo.betta'"),
        ({"loss_type": "sigmoidd"}, "dpo.loss_type"),
        ({"loss_type": []}, "give at least one loss type"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "1 weight(s) for 2 loss type(s)"),
        ({"loss_type": "exo_pair"}, "exo_pair needs label_smoothing > 0"),
        ({"label_smoothing": 0.5}, "dpo.label_smoothing"),
    ],
)
def test_dpo_section_is_strictly_validated(tmp_path, dpo, message):
    with pytest.raises(QtuneError, match=re.escape(message)):
        load_recipe(_recipe_file(tmp_path, method="dpo", dpo=dpo))


@pytest.mark.parametrize(("data", "message"), [({"packing": True}, "packing"), ({"train_on": "all"}, "train_on")])
def test_dpo_refuses_sft_only_data_settings(tmp_path, data, message):
    path = _recipe_file(tmp_path, method="dpo")
    with pytest.raises(QtuneError, match=f"data: {message}"):
        load_recipe(path, [f"data.{k}={str(v).lower()}" for k, v in data.items()])


def test_dpo_loss_types_are_trls():
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(re.findall(r"`'(\w+)'`", help_text)) == set(DPO_LOSS_TYPES)


def test_method_table_builds_each_methods_trl_config(tmp_path):
    """One table: method → TRL config class; the method section reaches DPOConfig, SFT stays SFTConfig."""
    from trl import DPOConfig, SFTConfig

    sft = load_recipe(_recipe_file(tmp_path), [f"output_dir={tmp_path / 'a'}"])
    assert type(train.trainer_config(sft, SINGLE)) is SFTConfig
    dpo = load_recipe(
        _recipe_file(tmp_path, method="dpo"),
        [f"output_dir={tmp_path / 'b'}", "dpo.beta=0.25", "dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1, 0.5]"],
    )
    args = train.trainer_config(dpo, SINGLE)
    assert type(args) is DPOConfig
    assert (args.beta, args.loss_type, args.loss_weights, args.max_length) == (0.25, ["sigmoid", "sft"], [1, 0.5], 2048)
    assert set(train.METHODS) == {"sft", "dpo"}


def test_training_extra_is_checked_against_the_methods_config(tmp_path):
    dpo = load_recipe(_recipe_file(tmp_path, method="dpo"), [f"output_dir={tmp_path / 'b'}"])
    with pytest.raises(QtuneError, match="DPOConfig has no argument 'packing'"):
        train.trainer_config(
            dpo.model_copy(update={"training": dpo.training.model_copy(update={"extra": {"packing": 1}})}), SINGLE
        )
    extra = dpo.training.model_copy(update={"extra": {"beta": 0.3}})
    with pytest.raises(QtuneError, match="already set by the recipe key dpo.beta"):
        train.trainer_config(dpo.model_copy(update={"training": extra}), SINGLE)
    extra = dpo.training.model_copy(update={"extra": {"f_divergence_type": "js_divergence"}})
    assert train.trainer_config(dpo.model_copy(update={"training": extra}), SINGLE).f_divergence_type == "js_divergence"
