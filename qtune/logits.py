"""Logits of a model on fixed prompts, and how far two sets of them are apart: the check behind `merge` (merged
model vs the adapter on its base) and `export-gguf` (the GGUF file read back vs the merged model)."""

from __future__ import annotations

from dataclasses import dataclass

VERIFY_PROMPTS = (
    "The meaning of life is",
    "Question: what is two plus two?\nAnswer:",
    "def fibonacci(n):",
)


@dataclass(frozen=True)
class Comparison:
    max_diff: float
    mean_diff: float
    top1: float
    scale: float  # largest |logit| of the reference

    def within(self, rel_tol: float, min_top1: float) -> bool:
        return self.max_diff <= rel_tol * max(1.0, self.scale) and self.top1 >= min_top1

    def text(self) -> str:
        return f"max |Δlogit| {self.max_diff:.3g}, mean {self.mean_diff:.3g}, top-1 agreement {100 * self.top1:.1f}%"


def prompt_logits(model, tokenizer, prompts) -> list:
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            out.append(model(**ids).logits[0].float().cpu())
    return out


def compare_logits(logits, reference) -> Comparison:
    import torch

    a, b = torch.cat(logits), torch.cat(reference)
    diff = (a - b).abs()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return Comparison(diff.max().item(), diff.mean().item(), top1, b.abs().max().item())
