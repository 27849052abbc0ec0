"""`qtune schema`: the recipe's JSON Schema, kept in recipes/recipe.schema.json, agrees with the recipe model."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import run_qtune_in_process
from qtune.config import INTEGER_STRING, NUMBER_STRING, dump_recipe, load_recipe, recipe_json_schema
from qtune.errors import QtuneError

ROOT = Path(__file__).parent.parent
SCHEMA_FILE = ROOT / "recipes" / "recipe.schema.json"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
MODELINE = re.compile(r"# yaml-language-server: \$schema=(\S+)$")


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)  # a valid draft-07 schema (what the YAML language server reads)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, data) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(data)]


def test_the_kept_schema_file_is_what_qtune_schema_prints():
    result = run_qtune_in_process("schema")
    assert result.returncode == 0 and result.stderr == ""
    assert json.loads(result.stdout) == recipe_json_schema()
    assert SCHEMA_FILE.read_text(encoding="utf-8") == result.stdout, (
        "recipes/recipe.schema.json is stale: run `qtune schema > recipes/recipe.schema.json` to update it"
    )
    assert result.stdout.startswith('{\n  "$schema": "http://json-schema.org/draft-07/schema#"')


def test_schema_takes_no_arguments():
    result = run_qtune_in_process("schema", "lora.r=8")
    assert result.returncode == 2 and "unrecognized arguments: lora.r=8" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_names_the_schema_and_validates(path, validator):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    match = MODELINE.match(first)
    assert match, f"{path.name} must start with `# yaml-language-server: $schema=recipe.schema.json`"
    assert (path.parent / match.group(1)).resolve() == SCHEMA_FILE.resolve()
    data = yaml.safe_load(path.read_text(encoding="utf-8"))  # PyYAML, as qtune reads it: lr: 2e-4 is a string
    assert _errors(validator, data) == []

    misspelt = copy.deepcopy(data)
    misspelt.setdefault("lora", {})["rank"] = 16
    assert any("'rank' was unexpected" in e for e in _errors(validator, misspelt)), "a misspelt key must fail"
    with pytest.raises(QtuneError, match="unknown key 'lora.rank'"):
        load_recipe(misspelt)

    wrong_enum = copy.deepcopy(data)
    wrong_enum.setdefault("quantization", {})["quant_type"] = "nf5"
    assert any(e.startswith("quantization.quant_type: 'nf5' is not one of") for e in _errors(validator, wrong_enum))


def test_every_object_is_strict_but_a_rewards_options_and_free_mappings():
    """additionalProperties: false on every section (a misspelt key fails anywhere); open only where the recipe
    takes any key: training.extra (TRL arguments), a reward's options, name → name maps."""
    schema = recipe_json_schema()
    assert schema["additionalProperties"] is False
    for name, definition in schema["definitions"].items():
        assert definition["type"] == "object" and "description" in definition, name
        assert definition["additionalProperties"] is (name == "RewardEntry"), name
        for key, prop in definition["properties"].items():
            assert prop.get("description"), f"{name}.{key} has no description"
    assert schema["definitions"]["TrainingSection"]["properties"]["extra"]["additionalProperties"] is True


def test_types_defaults_and_choices_come_from_the_model():
    d = recipe_json_schema()["definitions"]
    assert d["LoraSection"]["properties"]["r"]["default"] == 16
    assert d["LoraSection"]["properties"]["r"]["anyOf"][0] == {
        "exclusiveMinimum": 0,
        "maximum": 65536,
        "type": "integer",
    }
    assert d["QuantizationSection"]["properties"]["quant_type"]["enum"] == ["nf4", "fp4"]
    assert {"const": "all-linear", "type": "string"} in d["LoraSection"]["properties"]["target_modules"]["anyOf"]
    # draft-07 ignores a $ref's siblings: a section's default sits beside an allOf holding the $ref
    lora = recipe_json_schema()["properties"]["lora"]
    assert lora["allOf"] == [{"$ref": "#/definitions/LoraSection"}] and lora["default"]["r"] == 16
    assert "output_dir" not in recipe_json_schema()["required"]  # a recipe file may leave it out (runs/<name>)


# (key path, value, accepted): the JSON Schema and the recipe model agree on each, both ways.
AGREEMENT = [
    (("training", "lr"), "2e-4", True),  # YAML 1.1 reads 2e-4 as a string; the recipe parses it
    (("training", "lr"), "1.0e3", True),
    (("training", "lr"), "fast", False),
    (("training", "lr"), True, False),  # lax pydantic would read true as 1.0
    (("training", "max_steps"), "16", True),
    (("training", "max_steps"), "2e3", False),  # no exponent for a whole number (pydantic refuses it too)
    (("training", "max_steps"), 16.0, True),
    (("training", "max_steps"), 16.5, False),
    (("lora", "r"), True, False),  # lax pydantic would read true as 1
    (("lora", "target_modules"), ["q_proj", "v_proj"], True),
    (("lora", "target_modules"), "q_proj", False),  # a single name must be a list (or all-linear)
    (("lora", "target_modules"), "all-linear", True),
    (("data", "packing"), True, True),
    (("data", "packing"), 1, False),  # lax pydantic would read 1 as true
    (("data", "packing"), "yes", False),  # quoted: a string (unquoted yes is YAML 1.1's true)
    (("training", "resume"), "auto", True),
    (("training", "resume"), "sometimes", False),
    (("quantization", "bits"), 8, True),
    (("quantization", "bits"), "4", False),
    (("quantization", "bits"), None, True),
    (("quantization", "backend"), "gptq", True),
    (("quantization", "backend"), "gguf", False),
    (("data", "eval_split"), 0.1, True),
    (("data", "eval_split"), "test", True),
    (("model", "max_memory"), {"0": 20}, False),
    (("model", "name"), 7, False),
    (("training", "extra"), {"neftune_noise_alpha": 5}, True),
    (("tracking", "tags"), ["a", "b"], True),
    (("tracking", "tags"), "a", False),
    (("hub", "token"), "hf_x", False),
]


@pytest.mark.parametrize(("path", "value", "accepted"), AGREEMENT, ids=lambda v: str(v))
def test_the_schema_accepts_what_the_recipe_accepts(path, value, accepted, validator, tmp_path):
    data = {
        "model": {"name": "org/model"},
        "data": {"datasets": [{"path": "train.jsonl"}]},
        "output_dir": str(tmp_path / "run"),
    }
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    try:
        load_recipe(data)
        loaded = True
    except QtuneError as exc:
        loaded, why = False, str(exc)
    assert loaded is accepted, why if not loaded else "the recipe accepted it"
    assert (_errors(validator, data) == []) is accepted, _errors(validator, data)


def test_number_strings_match_what_the_recipe_parses():
    """NUMBER_STRING / INTEGER_STRING accept exactly the strings pydantic turns into finite numbers."""
    from pydantic import TypeAdapter

    def parses(kind, text: str) -> bool:
        try:
            return abs(TypeAdapter(kind).validate_python(text)) < float("inf")
        except ValueError:
            return False

    texts = ["16", "+16", "-3", "16.0", "16.", "16.5", "1e3", "2e-4", "2E+4", ".5", "5.", "1_000", "1__0", "_1",
             "1.0e-4", " 16 ", "1.2.3", "e5", "1e", "0x10", "inf", "nan", "", "1 000", "٣", "true"]  # fmt: skip
    for text in texts:
        assert parses(float, text) == bool(re.search(NUMBER_STRING, text)), text
        assert parses(int, text) == bool(re.search(INTEGER_STRING, text)), text


def test_a_resolved_recipe_validates(validator, tmp_path):
    """What qtune writes into a run (recipe.yaml, every default filled in) is a recipe the schema accepts."""
    data = {"method": "dpo", "model": {"name": "org/model"}, "data": {"datasets": [{"path": "pairs.jsonl"}]}}
    recipe = load_recipe(data, ["dpo.loss_type=[sigmoid, sft]", f"output_dir={tmp_path / 'run'}"])
    dump_recipe(recipe, tmp_path / "resolved.yaml")
    assert _errors(validator, yaml.safe_load((tmp_path / "resolved.yaml").read_text())) == []
