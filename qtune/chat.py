"""`qtune chat`: talk to a run's adapter on its 4-bit base (as trained), a merged model, or any local model.

Tokens stream to the terminal through transformers' TextStreamer; temperature 0 is greedy (deterministic).
"""

from __future__ import annotations

import sys
from pathlib import Path

from qtune.errors import QtuneError
from qtune.quant import describe as describe_quantization


def load_for_chat(target: str, merged: bool = False, allow_pickle: bool = False):
    """(model, tokenizer, description) for a run directory (adapter on the trained base, or its merged/) or a model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.model import check_weight_files, load_trained, refuse_reward_run, single_process_device_map
    from qtune.rundir import RunDir
    from qtune.stops import saved_stops, with_stops

    path = Path(target)
    if RunDir.is_run(path):
        run = RunDir.open(path)
        refuse_reward_run(run.recipe, run.path, "chat")
        if not merged:
            recipe = run.recipe
            model = load_trained(recipe, run.adapter, allow_pickle=allow_pickle)
            tokenizer = AutoTokenizer.from_pretrained(str(run.adapter))
            base = model.get_base_model()  # generates with the run's stop tokens, as the merged model does
            base.generation_config = with_stops(base.generation_config, saved_stops(run.adapter, tokenizer), tokenizer)
            return model, tokenizer, f"adapter {run.adapter} on {recipe.model.name} ({describe_quantization(recipe)})"
        path = run.require_merged()
    elif merged:
        raise QtuneError(f"--merged: {target} is not a run directory", "give RUN_DIR, or the model folder itself")
    check_weight_files(str(path), allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), device_map=single_process_device_map(), use_safetensors=None if allow_pickle else True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:  # ValueError: a folder without a model config transformers knows
        raise QtuneError(
            f"{target}: cannot load a model: {str(exc).strip().splitlines()[0][:300]}",
            "give a run directory, a local model folder with safetensors weights, or a cached hub id",
        ) from None
    return model.eval(), tokenizer, str(path)


def check_settings(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Generation settings in range (before any model loads)."""
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise QtuneError(
            "generation settings out of range", "temperature ≥ 0 (0: greedy), 0 < top_p ≤ 1, max_new_tokens ≥ 1"
        )


def generate(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stream=None,
) -> str:
    """One assistant turn: the chat template (or the raw text without one), streamed, returned as text."""
    import torch
    from transformers import TextStreamer

    check_settings(max_new_tokens, temperature, top_p)
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer("\n".join(m["content"] for m in messages), return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    settings = {"do_sample": False}
    if temperature > 0:
        settings = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **settings,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def chat(
    target: str,
    prompt: str | None = None,
    system: str | None = None,
    merged: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    allow_pickle: bool = False,
) -> int:
    """One-shot with `prompt` (the answer alone on stdout), else a REPL (/reset clears history, /exit or Ctrl-D quits)."""
    from transformers import set_seed

    check_settings(max_new_tokens, temperature, top_p)
    model, tokenizer, what = load_for_chat(target, merged, allow_pickle)
    set_seed(seed)
    base = [{"role": "system", "content": system}] if system else []
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    if prompt is not None:
        generate(model, tokenizer, [*base, {"role": "user", "content": prompt}], stream=True, **settings)
        sys.stdout.flush()
        return 0
    print(f"qtune chat: {what}. /reset clears the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    history = list(base)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(base)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        answer = generate(model, tokenizer, history, stream=True, **settings)
        history.append({"role": "assistant", "content": answer})
