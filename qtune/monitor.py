"""What a user watches while a run goes and reads after it: the figures added to every log step, the
console (a progress bar or, with --quiet, log lines only), `metrics.jsonl`, the start summary, the
Ctrl-C / SIGTERM stop with a checkpoint, the NaN/inf guard, `loss.png`.

Everything here is a `transformers.TrainerCallback` that reads the Trainer's state and logs and sets
`TrainerControl` flags; the loop is TRL's. Imported only by `qtune.training.run_training` (transformers at module
level is fine here: `qtune --help` never reaches this module).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from transformers import ProgressCallback, TrainerCallback

from qtune.config import Recipe
from qtune.rewards import reward_means
from qtune.rundir import write_text_atomic

GB = 1024**3
# Trainer log entries that duplicate qtune's own figures (tokens, tokens/s) or are end-of-run totals.
SKIPPED_LOG_KEYS = {
    "epoch",
    "num_input_tokens_seen",
    "num_tokens",
    "train_runtime",
    "train_tokens_per_second",
    "total_flos",
}


def peak_memory_bytes() -> dict[str, int]:
    """The one reader of this process's peak memory so far: the GPU allocator's peaks ("allocated",
    "reserved") when CUDA is in use, else the peak resident set ("rss") of the whole process."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"rss": kib * (1 if sys.platform == "darwin" else 1024)}  # bytes on macOS


def peak_memory() -> dict[str, float]:
    """peak_memory_bytes in GiB, under the names metrics.jsonl and summary.json use."""
    peak = peak_memory_bytes()
    if "rss" in peak:
        return {"peak_rss_gb": round(peak["rss"] / GB, 3)}
    return {"peak_mem_gb": round(peak["allocated"] / GB, 3), "peak_reserved_gb": round(peak["reserved"] / GB, 3)}


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_line(record: dict, max_steps: int) -> str:
    """One log step as a readable console line."""
    step = record.get("step", 0)
    parts = [f"step {step}/{max_steps}"]
    if "eval_loss" in record:
        parts.append(f"eval loss {record['eval_loss']:.4f}")
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if record.get("grad_norm") is not None:
        parts.append(f"grad {record['grad_norm']:.3f}")
    parts += _preference_parts(record)
    parts += _online_parts(record)
    if "tokens_per_s" in record:
        per_device = record.get("tokens_per_s_per_device", record["tokens_per_s"])
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s ({per_device:,.0f}/device)")
    if "samples_per_s" in record:
        parts.append(f"{record['samples_per_s']:.2f} samples/s")
    if "peak_mem_gb" in record:
        parts.append(f"GPU peak {record['peak_mem_gb']:.2f} GB (reserved {record['peak_reserved_gb']:.2f})")
    elif "peak_rss_gb" in record:
        parts.append(f"RSS peak {record['peak_rss_gb']:.2f} GB")
    if "elapsed_s" in record:
        parts.append(f"{_clock(record['elapsed_s'])} elapsed, {_clock(record.get('remaining_s'))} left")
    return " | ".join(parts)


# Preference methods' per-step figures (TRL's DPO / KTO / ORPO / CPO names; eval ones prefixed eval_), as the
# console shows them: key → label, format.
PREFERENCE_FIGURES = {
    "rewards/chosen": ("chosen", "{:+.3f}"),
    "rewards/rejected": ("rejected", "{:+.3f}"),
    "rewards/margins": ("margin", "{:+.3f}"),
    "rewards/accuracies": ("acc", "{:.0%}"),
    "logps/chosen": ("logp chosen", "{:.2f}"),
    "logps/rejected": ("logp rejected", "{:.2f}"),
}


def _preference_parts(record: dict) -> list[str]:
    """The reward figures of a preference run's log step (train, or eval with their eval_ prefix)."""
    parts = []
    for prefix in ("", "eval_"):
        for key, (label, fmt) in PREFERENCE_FIGURES.items():
            value = record.get(prefix + key)
            if isinstance(value, (int, float)):
                parts.append(f"{'eval ' if prefix else ''}{label} {fmt.format(value)}")
    if parts:
        parts[0] = "rewards: " + parts[0]
    return parts


def _online_parts(record: dict) -> list[str]:
    """The reward figures of a grpo / rloo log step: the weighted total with each function's mean, the KL to the
    starting policy (beta > 0) and the mean completion length; train, or eval (held-out prompts)."""
    parts = []
    for prefix, label in (("", ""), ("eval_", "eval ")):
        total = record.get(prefix + "reward")
        if not isinstance(total, (int, float)):
            continue
        each = ", ".join(f"{name} {value:.3f}" for name, value in reward_means(record, prefix).items())
        parts.append(f"{label}reward {total:.3f}" + (f" ({each})" if each else ""))
        if isinstance(record.get(prefix + "kl"), (int, float)):
            parts.append(f"{label}kl {record[prefix + 'kl']:.4f}")
        if isinstance(record.get(prefix + "completions/mean_length"), (int, float)):
            parts.append(f"{label}completion {record[prefix + 'completions/mean_length']:.1f} tokens")
    return parts


def _parsed(line: str) -> dict | None:
    """A metrics.jsonl line's record; None for a line a kill cut short (or anything else unreadable)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line a kill cut short (or anything else unreadable)."""
    record = _parsed(line)
    return None if record is None else record.get("step", 0)


class RunMonitor(TrainerCallback):
    """Adds throughput, memory and time figures to every training log (so every tracker gets them), writes
    each log step to `metrics.jsonl` on the main process, and prints the start summary.

    Must run before the other callbacks' `on_log` (train.run_training puts it first): they see the same `logs` dict.
    """

    def __init__(
        self,
        recipe: Recipe,
        metrics_path: Path,
        world_size: int,
        start_lines: list[tuple[str, str]],
        step_logs: tuple[Path, ...] = (),
    ):
        self.recipe = recipe
        self.metrics_path = metrics_path
        self.step_logs = (metrics_path, *step_logs)  # JSON lines with a "step" each (samples.jsonl): kept in step
        self.world_size = world_size
        self.start_lines = start_lines
        self.session_start = time.time()
        self.first_step = 0
        self.tokens_at_start = 0
        self.last = (self.session_start, 0, 0)  # time, step, tokens at the previous train log
        self.final: dict = {}

    # ---- start
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.session_start = time.time()
        self.first_step = state.global_step
        self.tokens_at_start = state.num_input_tokens_seen
        self.last = (self.session_start, state.global_step, state.num_input_tokens_seen)
        if not state.is_world_process_zero:
            return
        for path in self.step_logs:
            if state.global_step and path.exists():
                # Resumed: lines logged after the checkpoint are redone by this session; keep one line per step.
                kept = [
                    line
                    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if _logged_step(line) is not None and _logged_step(line) <= state.global_step
                ]
                write_text_atomic(path, "".join(line + "\n" for line in kept))
            elif not state.global_step and path.exists():
                path.unlink()
        lines = list(self.start_lines)
        if model is not None and hasattr(model, "get_nb_trainable_parameters"):
            trainable, total = model.get_nb_trainable_parameters()
            lines.insert(2, ("trainable", f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)"))
        steps = f"{state.max_steps} optimizer steps ({state.num_train_epochs} epoch(s) over the data)"
        if state.global_step:
            steps += f", resuming at step {state.global_step}"
        lines.append(("steps", steps))
        width = max(len(k) for k, _ in lines)
        print("qtune: run summary", flush=True)
        for key, value in lines:
            print(f"  {key:<{width}}  {value}", flush=True)

    # ---- every log step
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        now = time.time()
        is_train_log = "loss" in logs and "train_loss" not in logs
        if is_train_log:
            t0, step0, tokens0 = self.last
            tokens = state.num_input_tokens_seen
            dt = max(now - t0, 1e-9)
            samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * self.world_size
            done_here = state.global_step - self.first_step
            elapsed = now - self.session_start
            figures = {
                "tokens": tokens,
                "tokens_per_s": round((tokens - tokens0) / dt, 2),
                "tokens_per_s_per_device": round((tokens - tokens0) / dt / self.world_size, 2),
                "samples_per_s": round((state.global_step - step0) * samples_per_step / dt, 3),
                **peak_memory(),
                "elapsed_s": round(elapsed, 2),
                "remaining_s": round(elapsed / done_here * (state.max_steps - state.global_step), 2)
                if done_here
                else None,
            }
            logs.update({k: v for k, v in figures.items() if v is not None})
            self.last = (now, state.global_step, tokens)
        if not state.is_world_process_zero or "train_loss" in logs:  # the end-of-training totals: summary.json
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key, value in logs.items():
            if key in SKIPPED_LOG_KEYS:
                continue
            if isinstance(value, (int, float)):
                record["lr" if key == "learning_rate" else key] = value
        record["time"] = round(now, 3)
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        self.final.update(record)


class Console(ProgressCallback):
    """transformers' progress bar on the main process, with each log step as one readable line under it;
    with `quiet`, no bar: the log lines only. Other ranks print nothing."""

    def __init__(self, quiet: bool = False):
        super().__init__()
        self.quiet = quiet

    def on_train_begin(self, args, state, control, **kwargs):
        self.current_step = 0
        if not self.quiet:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.quiet:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not self.quiet:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_loss" in logs:
            return
        record = {"lr" if k == "learning_rate" else k: v for k, v in logs.items()}
        line = format_line({**record, "step": state.global_step}, state.max_steps)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


class StopGuard(TrainerCallback):
    """Ends a run cleanly instead of losing it or training on garbage.

    - SIGTERM / Ctrl-C: finish the current optimizer step, save a checkpoint, stop (a second Ctrl-C stops
      at once). Under DDP the ranks agree on the stop before acting.
    - A non-finite training loss (or non-finite adapter weights about to be checkpointed): stop without
      saving, so the last checkpoint on disk stays the last good one.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signal_name: str | None = None
        self.bad: tuple[int, str] | None = None  # (step, what)
        self._previous: dict = {}

    # ---- signals
    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # second signal: stop now
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signal_name = name
        print(
            f"\nqtune: {name} received: saving a checkpoint after this step, then stopping"
            + (" (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""),
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def _stop_requested(self, args) -> bool:
        requested = self.signal_name is not None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            flag = torch.tensor([1 if requested else 0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and self.signal_name is None:
                self.signal_name = "a stop on another rank"
            requested = bool(flag.item())
        return requested

    # ---- every step
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._stop_requested(args):
            control.should_save = True
            control.should_training_stop = True
        if control.should_save and model is not None:
            broken = [n for n, p in model.named_parameters() if p.requires_grad and not bool(p.isfinite().all())]
            if broken:
                self.bad = (state.global_step, f"non-finite adapter weights ({broken[0]} …)")
                control.should_save = False
                control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self.bad = (state.global_step, f"{key} {value}")
                control.should_save = False
                control.should_training_stop = True
        return control


def _records(metrics_path: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (a line a kill cut short is skipped); [] when the file is missing."""
    if not metrics_path.is_file():
        return []
    lines = metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [record for record in map(_parsed, lines) if record is not None]


def _points(records: list[dict], key: str) -> list[tuple]:
    """(step, value) of every record that logged a number under KEY."""
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def _figure(height: float, rows: int = 1):
    """A matplotlib Figure (no GUI backend) and its ROWS axes, sharing the step axis."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, height), dpi=100)
    return fig, fig.subplots(rows, 1, sharex=True)


def _plot(ax, points: list[tuple], label: str, dots: bool = False, **style) -> None:
    """One series; dots on every point when asked (eval figures) or when there are few."""
    if points:
        ax.plot(*zip(*points, strict=True), label=label, marker="o" if dots or len(points) < 40 else None, **style)


def _save(fig, axes, png_path: Path, title: str) -> bool:
    """Grid and legend on every axis with lines, the title, then the PNG written whole (a temporary file renamed)."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    axes[0].set_title(title)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(png_path)
    return True


def plot_loss(metrics_path: Path, png_path: Path) -> bool:
    """Train (and eval) loss against step from metrics.jsonl into a PNG; False when there is nothing to plot."""
    records = _records(metrics_path)
    train, evals = _points(records, "loss"), _points(records, "eval_loss")
    if not train and not evals:
        return False
    fig, ax = _figure(4)
    _plot(ax, train, "train loss")
    _plot(ax, evals, "eval loss", dots=True)
    ax.set_ylabel("loss")
    return _save(fig, [ax], png_path, png_path.parent.name)


def plot_rewards(metrics_path: Path, png_path: Path) -> bool:
    """Preference runs: the implicit reward margin (chosen - rejected) and the reward accuracy (share of pairs whose
    chosen answer out-scores the rejected one), train and eval, against step, into a PNG; False when metrics.jsonl
    has no reward figures (SFT) or is missing."""
    records = _records(metrics_path)
    series = {
        key: _points(records, key)
        for key in ("rewards/margins", "rewards/accuracies", "eval_rewards/margins", "eval_rewards/accuracies")
    }
    if not any(series.values()):
        return False
    fig, (top, bottom) = _figure(6, rows=2)
    for ax, what, label in ((top, "margins", "reward margin"), (bottom, "accuracies", "reward accuracy")):
        _plot(ax, series[f"rewards/{what}"], f"train {label}")
        _plot(ax, series[f"eval_rewards/{what}"], f"eval {label}", dots=True)
        ax.set_ylabel(label)
    if series["rewards/accuracies"] or series["eval_rewards/accuracies"]:
        bottom.set_ylim(-0.05, 1.05)
    return _save(fig, [top, bottom], png_path, f"{png_path.parent.name}: chosen vs rejected")


def plot_reward_curve(metrics_path: Path, png_path: Path) -> bool:
    """grpo / rloo: the mean reward (weighted total, and each function's mean) of the training batches and of the
    held-out prompts (eval, before training at step 0 and after) against step, into a PNG; False when metrics.jsonl
    has no such figures (other methods) or is missing."""
    totals, means = {}, {}  # (label prefix) -> points; (function name, held out) -> points
    for record in _records(metrics_path):
        for prefix in ("", "eval_"):
            if isinstance(record.get(prefix + "reward"), (int, float)):
                totals.setdefault(prefix, []).append((record["step"], record[prefix + "reward"]))
                for name, value in reward_means(record, prefix).items():
                    means.setdefault((name, bool(prefix)), []).append((record["step"], value))
    if not totals:
        return False
    fig, (top, bottom) = _figure(6, rows=2)
    _plot(top, totals.get("", []), "train reward")
    _plot(top, totals.get("eval_", []), "held-out reward", dots=True)
    names = list(dict.fromkeys(name for name, _ in means))
    for (name, held_out), points in means.items():
        label = f"{'held-out' if held_out else 'train'} {name}"
        # one colour per function: train solid, held-out dashed
        _plot(
            bottom,
            points,
            label,
            dots=held_out,
            linestyle="--" if held_out else "-",
            color=f"C{names.index(name) % 10}",
        )
    top.set_ylabel("reward (weighted sum)")
    bottom.set_ylabel("mean per reward function")
    return _save(fig, [top, bottom], png_path, f"{png_path.parent.name}: mean reward")
