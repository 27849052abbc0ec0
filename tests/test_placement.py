"""Placement follows the launch: one GPU, `device_map: auto` over several, one replica per rank, or the CPU."""

from __future__ import annotations

import pytest
import torch

from qtune import model as qmodel
from qtune.config import load_recipe
from qtune.model import Launch, device_map_for


def test_device_map_per_launch(make_recipe, monkeypatch):
    plain = load_recipe(make_recipe())
    spread = load_recipe(make_recipe(), ["model.device_map=auto", 'model.max_memory={"0": 10GiB, "1": 10GiB}'])
    monkeypatch.setattr(qmodel, "_cuda_available", lambda: False)
    assert device_map_for(plain, Launch(1, 0, 0, "NO")) is None  # CPU
    monkeypatch.setattr(qmodel, "_cuda_available", lambda: True)
    assert device_map_for(plain, Launch(1, 0, 0, "NO")) == {"": 0}  # one GPU
    assert device_map_for(plain, Launch(2, 1, 1, "MULTI_GPU")) == {"": 1}  # DDP: the rank's own GPU
    assert device_map_for(spread, Launch(1, 0, 0, "NO")) == "auto"
    assert qmodel._max_memory(spread) == {0: "10GiB", 1: "10GiB"}


@pytest.mark.gpu
def test_4bit_model_lands_on_the_gpu(make_recipe):
    recipe = load_recipe(make_recipe())
    peft_model = qmodel.load_for_training(recipe, Launch(1, 0, 0, "NO"), qmodel.load_tokenizer(recipe), verbose=False)
    assert {p.device.type for p in peft_model.parameters()} == {"cuda"}
    assert torch.cuda.memory_allocated() > 0


@pytest.mark.gpu
def test_device_map_auto_spreads_over_visible_gpus(make_recipe):
    recipe = load_recipe(make_recipe(), ["model.device_map=auto"])
    peft_model = qmodel.load_for_training(recipe, Launch(1, 0, 0, "NO"), qmodel.load_tokenizer(recipe), verbose=False)
    used = {p.device.index for p in peft_model.parameters()}
    assert used <= set(range(torch.cuda.device_count())) and used
