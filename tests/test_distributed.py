"""FSDP, DeepSpeed and multi-process launches: the shipped accelerate configs, what qtune sets for QLoRA under
them, the bad combinations refused before any model loads, and a real 2-rank FSDP wrap on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import qtune
from conftest import run_qtune_in_process
from qtune import model as qmodel
from qtune import training
from qtune.config import load_recipe
from qtune.model import Launch, detect_launch, device_map_for
from qtune.quant import quantization_config

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "recipes" / "accelerate"
LAUNCH_ENV = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "ACCELERATE_USE_FSDP",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "FSDP_VERSION",
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
)
FSDP = Launch(2, 0, 0, "FSDP", fsdp_version=1)
ZERO3 = Launch(2, 0, 0, "DEEPSPEED", zero_stage=3)
ZERO2 = Launch(2, 0, 0, "DEEPSPEED", zero_stage=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the shipped accelerate configs


def _config(name: str) -> dict:
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / name
    load_config_from_file(str(path))  # accelerate itself accepts it (unknown keys or values raise)
    return yaml.safe_load(path.read_text())


def test_shipped_accelerate_configs():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {
        "single-gpu.yaml",
        "ddp.yaml",
        "fsdp.yaml",
        "deepspeed-zero2.yaml",
        "deepspeed-zero3.yaml",
        "multi-node.yaml",
    }
    assert _config("single-gpu.yaml")["num_processes"] == 1
    assert _config("ddp.yaml")["distributed_type"] == "MULTI_GPU"
    for name in ("fsdp.yaml", "multi-node.yaml"):
        fsdp = _config(name)["fsdp_config"]
        assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_use_orig_params"] is False  # peft's FSDP-QLoRA setting
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert _config("deepspeed-zero2.yaml")["deepspeed_config"]["zero_stage"] == 2
    zero3 = _config("deepspeed-zero3.yaml")["deepspeed_config"]
    assert zero3["zero_stage"] == 3 and zero3["zero3_init_flag"] and zero3["zero3_save_16bit_model"]
    multi = _config("multi-node.yaml")
    assert (multi["num_machines"], multi["num_processes"]) == (2, 16)
    edits = [line for line in (CONFIGS / "multi-node.yaml").read_text().splitlines() if "# EDIT" in line]
    assert {line.split(":")[0].strip() for line in edits} >= {
        "num_machines",
        "num_processes",
        "machine_rank",
        "main_process_ip",
        "main_process_port",
    }


def test_70b_recipe_splits_its_batch_on_2_to_16_gpus():
    recipe = load_recipe(ROOT / "recipes" / "llama2-70b-qlora.yaml")
    assert recipe.training.global_batch_size == 32 and recipe.model.dtype == "bfloat16"
    assert [training.grad_accum_for(recipe, Launch(n, 0, 0, "FSDP")) for n in (2, 4, 8, 16)] == [16, 8, 4, 2]
    training.check_launch(recipe.model_copy(), Launch(1, 0, 0, "NO"))


# --------------------------------------------------------------------------- what qtune sets under the engines


def test_launch_reads_engine_details(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert detect_launch() == Launch(1, 0, 0, "NO") and not detect_launch().sharded
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert detect_launch() == Launch(4, 3, 1, "MULTI_GPU") and not detect_launch().sharded
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert detect_launch() == ZERO3 and detect_launch().sharded
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert not detect_launch().sharded  # ZeRO-2 keeps a whole replica per rank, like DDP
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert detect_launch() == Launch(2, 0, 0, "FSDP", fsdp_version=2) and detect_launch().sharded


def test_sharded_launch_stores_4bit_in_the_param_dtype_and_places_nothing(make_recipe, monkeypatch):
    recipe = load_recipe(make_recipe(model={"dtype": "bfloat16"}))
    assert (
        quantization_config(recipe, Launch(1, 0, 0, "NO")).bnb_4bit_quant_storage == torch.uint8
    )  # bitsandbytes' default
    assert quantization_config(recipe, ZERO2).bnb_4bit_quant_storage == torch.uint8
    for launch in (FSDP, ZERO3):
        assert quantization_config(recipe, launch).bnb_4bit_quant_storage == torch.bfloat16
    monkeypatch.setattr(qmodel, "_cuda_available", lambda: True)
    assert device_map_for(recipe, FSDP) is None and device_map_for(recipe, ZERO3) is None  # the engine shards
    assert device_map_for(recipe, ZERO2) == {"": 0}
    same = load_recipe(make_recipe(model={"dtype": "bfloat16"}, quantization={"bits": 4, "quant_storage": "bfloat16"}))
    training.check_launch(same, FSDP) if torch.cuda.is_available() else None


def test_global_batch_sets_grad_accum_per_world_size(make_recipe):
    recipe = load_recipe(make_recipe(training={"micro_batch_size": 2, "global_batch_size": 16}))
    assert [training.grad_accum_for(recipe, Launch(n, 0, 0, "MULTI_GPU")) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    args = training.trainer_config(recipe, Launch(1, 0, 0, "NO"))
    assert args.gradient_accumulation_steps == 8
    plain = load_recipe(make_recipe(training={"grad_accum": 3}))
    assert training.grad_accum_for(plain, Launch(4, 0, 0, "MULTI_GPU")) == 3  # no global batch: grad_accum as given


# --------------------------------------------------------------------------- refused before any model loads

# Each: recipe sections, launcher environment, text the error line must hold.
BAD_LAUNCHES = {
    "fsdp_8bit": (
        {"quantization": {"bits": 8}},
        {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
        ["quantization.bits: 8", "FSDP", "accelerate config: distributed_type FSDP, 2 processes"],
    ),
    "fsdp_quant_storage_mismatch": (
        {"model": {"dtype": "float32"}, "quantization": {"bits": 4, "quant_storage": "bfloat16"}},
        {"ACCELERATE_USE_FSDP": "true"},
        ["quantization.quant_storage: bfloat16", "model.dtype float32", "accelerate config"],
    ),
    "fsdp_on_cpu": (
        {},
        {"ACCELERATE_USE_FSDP": "true"},
        ["FSDP launch on a machine without a GPU", "accelerate config: distributed_type FSDP"],
    ),
    "zero3_8bit": (
        {"quantization": {"bits": 8}},
        {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
        ["quantization.bits: 8", "ZeRO-3", "zero_stage 3"],
    ),
    "zero3_without_16bit_save": (
        {},
        {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
            "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false",
        },
        ["zero3_save_16bit_model: false", "zero_stage 3"],
    ),
    "deepspeed_fixed_grad_accum": (
        {"training": {"grad_accum": 2}},
        {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "8",
        },
        ["training.grad_accum: 2", "gradient_accumulation_steps: 8"],
    ),
    "device_map_under_fsdp": (
        {"model": {"device_map": "auto"}},
        {"ACCELERATE_USE_FSDP": "true"},
        ["model.device_map", "distributed_type FSDP, 2 processes"],
    ),
    "global_batch_not_divisible": (
        {"training": {"micro_batch_size": 4, "global_batch_size": 12}},
        {},
        ["training.global_batch_size: 12", "2 process(es) x training.micro_batch_size 4 = 8", "MULTI_GPU"],
    ),
    "fsdp_8bit_optimizer_checkpoints": (
        {"training": {"optimizer": "paged_adamw_8bit", "save_steps": 10}},
        {"ACCELERATE_USE_FSDP": "true"},
        ["training.optimizer: paged_adamw_8bit", "FSDP"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LAUNCHES))
def test_bad_launch_refused_before_the_model_loads(case, make_recipe, tmp_path):
    sections, env, expected = BAD_LAUNCHES[case]
    if case == "fsdp_on_cpu" and torch.cuda.is_available():
        pytest.skip("the CPU refusal needs a machine without a GPU")
    # a model and data that do not exist: the launch check must come first
    sections = {
        **sections,
        "model": {"name": str(tmp_path / "no-such-model"), **sections.get("model", {})},
        "data": {"datasets": [{"path": str(tmp_path / "no-such-data.jsonl")}]},
    }
    recipe = make_recipe(**sections)
    # In-process (the launcher's variables are read when the command runs; test_fsdp_accelerate_launch_… below
    # goes through the real launcher). No CUDA_VISIBLE_DEVICES here: it would hide the GPU from later tests.
    launcher = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", **env}
    result = run_qtune_in_process("train", recipe, "--check", env=launcher)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    assert "hint:" in result.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- real processes

WRAP_SCRIPT = r'''
"""Two ranks (gloo, CPU): the model qtune loads for an FSDP launch, wrapped by FSDP1 the way the Trainer does
under recipes/accelerate/fsdp.yaml (peft's auto-wrap policy, use_orig_params false), trained 2 steps, then the
adapter gathered from a full state dict and saved by rank 0 the way qtune.training.run_training saves it."""
import json, os, sys
import torch
import torch.distributed as dist


def main(rank, world, recipe_path, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
    from qtune import model as qmodel, training
    from qtune.config import load_recipe

    recipe = load_recipe(recipe_path)
    launch = qmodel.Launch(world, rank, rank, "FSDP", fsdp_version=1)
    model = qmodel.load_for_training(recipe, launch, qmodel.load_tokenizer(recipe), verbose=False)
    training.keep_adapter_fp32(model)
    total = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                   device_id=torch.device("cpu"))
    units = sum(isinstance(m, FSDP) for m in wrapped.modules())
    local = sum(p.numel() for p in wrapped.parameters())
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(rank)
    ids = torch.randint(3, 60, (2, 16))
    losses = []
    for _ in range(2):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # accelerate's get_state_dict uses offload_to_cpu=True, which FSDP1 cannot do for CPU-resident shards
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
        full = wrapped.state_dict()
    if rank == 0:
        training.save_gathered_adapter(model, full, __import__("pathlib").Path(out))
        probe = {"dtypes": dtypes, "units": units, "local": local, "total": total, "losses": losses,
                 "fingerprint": training._adapter_fingerprint_of(full)}
        (__import__("pathlib").Path(out) / "probe.json").write_text(json.dumps(probe))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(main, args=(2, sys.argv[1], sys.argv[2], int(sys.argv[3])), nprocs=2)
'''


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, None], ids=["nf4", "no-quant"])
def test_two_rank_fsdp_wraps_trains_and_saves_a_single_device_adapter(bits, make_recipe, tiny_llama, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = make_recipe(quantization={"bits": bits})
    script = tmp_path / "fsdp_wrap.py"
    script.write_text(WRAP_SCRIPT)
    out = tmp_path / "adapter"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script), str(recipe), str(out), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    probe = json.loads((out / "probe.json").read_text())
    assert len(probe["dtypes"]) == 1  # one dtype throughout: 4-bit stored in the param dtype, no fp32 upcast
    assert probe["units"] > 2  # decoder layers and LoRA layers wrapped apart (peft's policy)
    assert probe["local"] < probe["total"]  # each rank holds a shard, not the model
    assert all(loss == loss for loss in probe["losses"])
    assert probe["losses"][1] < probe["losses"][0]

    # The gathered adapter is a normal peft adapter: it loads onto one device, on an unquantized base.
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # trained (lora_B starts at 0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, out)
    name = next(k for k in weights if "lora_B" in k)
    key = name.replace(".weight", ".default.weight")
    assert torch.equal(dict(loaded.named_parameters())[key].detach(), weights[name])


@pytest.mark.multiproc
@pytest.mark.slow
def test_fsdp_accelerate_launch_on_the_cpu_is_refused_clearly(make_recipe, tmp_path):
    """The shipped fsdp.yaml through the real launcher: every rank sees FSDP and says why it cannot run here."""
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without a GPU")
    recipe = make_recipe()
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        str(Path(qtune.__file__).parent), "train", str(recipe), "--check",
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # Each rank refuses before any model loads; the launcher may stop the second rank before it prints.
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, result.stderr[-3000:]
    assert "distributed_type FSDP, 2 processes, fsdp_version 1" in errors[0]
