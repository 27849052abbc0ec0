"""DPO holds its reference as a second, frozen LoRA adapter on the same 4-bit base, never a second base (issue #16).

Runs scripts/bench_pref_memory.py once at a small size: `qtune train` as two child processes (SFT, DPO) on the same
tiny model, batch, max_length and steps. Asserted: the DPO trainer's model holds exactly the SFT model's 4-bit base
(same Params4bit count, bytes and distinct storages, same non-LoRA parameters) plus one LoRA-sized "ref" adapter.
The peak-RSS ratio is not asserted: one CPU run's RSS varies by ~20% (a DPO run measured 1.18× the SFT median once),
so it is the benchmark's, as a median of repeated runs (docs/benchmarks.md, "Preference methods: peak memory
against SFT")."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_pref_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_pref_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dpo_holds_one_4bit_base_and_a_lora_sized_reference():
    bench = _bench()
    args = argparse.Namespace(
        hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, lora_r=8, max_length=64, digits=24, rows=16,
        micro_batch=4, steps=2, repeats=1, json=True,
    )  # fmt: skip
    result = bench.measure(args)
    sft, dpo = result["counts"]["sft"], result["counts"]["dpo"]

    # One base: the same 4-bit weights, each in its own storage, none duplicated, and the same unquantized rest.
    assert sft["quantized_weights"] == dpo["quantized_weights"] == sft["linear4bit_modules"] > 0
    assert dpo["linear4bit_modules"] == sft["linear4bit_modules"]
    assert sft["quantized_bytes"] == dpo["quantized_bytes"] > 0
    assert dpo["quantized_storages"] == dpo["quantized_weights"]
    assert dpo["other_params"] == sft["other_params"]
    # The reference is a LoRA adapter the size of the trained one, and small next to the base.
    assert set(sft["lora_params"]) == {"default"} and set(dpo["lora_params"]) == {"default", "ref"}
    assert dpo["lora_params"]["ref"] == dpo["lora_params"]["default"] == sft["lora_params"]["default"]
    assert dpo["lora_params"]["ref"] * 4 < dpo["quantized_bytes"] * 2  # fp32 LoRA bytes < the 4-bit base's
