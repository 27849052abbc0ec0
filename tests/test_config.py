"""The recipe schema: typed keys, file/line in errors, did-you-mean, overrides, the resolved dump."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qtune.config import dump_recipe, load_recipe, parse_override, recipe_reference
from qtune.errors import QtuneError

BASE = """\
model:
  name: some/model
data:
  datasets:
    - path: train.jsonl
training:
  lr: 2e-4
"""


def _write(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_exponent_without_dot(tmp_path):
    # YAML 1.1 reads 2e-4 (no dot) as a string; the recipe and its overrides must still take it as a number.
    r = load_recipe(_write(tmp_path, BASE), ["training.weight_decay=1e-2"])
    assert r.training.lr == 2e-4 and isinstance(r.training.lr, float)
    assert r.training.weight_decay == pytest.approx(1e-2) and isinstance(r.training.weight_decay, float)
    assert (r.quantization.bits, r.quantization.quant_type, r.quantization.double_quant) == (4, "nf4", True)
    assert r.lora.target_modules == "all-linear"
    assert r.output_dir == "runs/r"  # named after the recipe file


def test_unknown_key_names_line_and_suggests(tmp_path):
    path = _write(tmp_path, BASE + "lora:\n  rank: 8\n")
    with pytest.raises(QtuneError) as err:
        load_recipe(path)
    assert err.value.message == f"{path}:9: unknown key 'lora.rank'"
    assert "did you mean 'lora.r'?" in err.value.hint


def test_error_inside_a_list_names_the_item(tmp_path):
    path = _write(tmp_path, BASE.replace("    - path: train.jsonl", "    - path: train.jsonl\n      fromat: messages"))
    with pytest.raises(QtuneError) as err:
        load_recipe(path)
    assert "data.datasets.0.fromat" in err.value.message and ":6:" in err.value.message
    assert "did you mean 'data.datasets.0.format'?" in err.value.hint


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("quantization.bits=3", "quantization.bits"),
        ("lora.r=0", "lora.r"),
        ("training.micro_batch_size=many", "micro_batch_size"),
    ],
)
def test_overrides_are_validated_and_named(tmp_path, override, expected):
    with pytest.raises(QtuneError) as err:
        load_recipe(_write(tmp_path, BASE), [override])
    assert err.value.message.startswith(f"override '{override}'") and expected in err.value.message


def test_overrides_set_nested_and_list_values(tmp_path):
    r = load_recipe(
        _write(tmp_path, BASE),
        [
            "lora.target_modules=[q_proj, v_proj]",
            "data.datasets.0.format=messages",
            "quantization.bits=null",
            "training.lr=1e-5",
        ],
    )
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.datasets[0].format == "messages"
    assert r.quantization.bits is None and r.training.lr == 1e-5


def test_override_needs_equals():
    with pytest.raises(QtuneError):
        parse_override("lora.r")


def test_hub_token_is_refused_with_a_pointer_to_the_environment(tmp_path):
    with pytest.raises(QtuneError) as err:
        load_recipe(_write(tmp_path, BASE + "hub:\n  token: hf_abc\n"))
    assert "HF_TOKEN" in err.value.hint


def test_resolved_dump_round_trips_and_redacts_secrets(tmp_path):
    r = load_recipe(_write(tmp_path, BASE), ["training.extra={hub_token: hf_secret, report_to_key: x}"])
    dump_recipe(r, tmp_path / "out" / "recipe.yaml")
    text = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "hf_secret" not in text
    dumped = yaml.safe_load(text)
    assert dumped["training"]["lr"] == 2e-4 and dumped["quantization"]["bits"] == 4
    again = load_recipe(tmp_path / "out" / "recipe.yaml")
    assert again.lora == r.lora and again.quantization == r.quantization


def test_reference_documents_every_section():
    table = recipe_reference()
    for key in (
        "model.name",
        "quantization.bits",
        "lora.r",
        "data.datasets[].path",
        "training.lr",
        "tracking.backend",
        "hub.push",
        "output_dir",
    ):
        assert f"`{key}`" in table


def test_readme_reference_matches_the_schema():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert recipe_reference() in readme, "README's recipe reference is stale: paste `qtune recipe-reference`"


def test_readme_layout_names_every_module():
    """README's Layout block is the map of the tree: every module of qtune/ and qtune/data/ is in it, and nothing
    it names under qtune/ is gone."""
    import re

    root = Path(__file__).resolve().parents[1]
    block = (root / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("```")[1]
    modules = {p.relative_to(root / "qtune").as_posix() for p in (root / "qtune").rglob("*.py")}
    modules -= {"__init__.py", "data/__init__.py"}
    named = set(re.findall(r"^qtune/(\S+\.py)", block, re.M)) | {
        f"data/{m}" for m in re.findall(r"^  (\S+\.py)", block, re.M)
    }
    assert modules - named == set(), "modules missing from README's Layout"
    assert named - modules == set(), "README's Layout names modules that do not exist"
