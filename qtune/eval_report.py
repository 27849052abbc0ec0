"""`qtune eval`'s report.html: one self-contained page (no file or network it needs besides itself): the figures as
a table and as an inline PNG chart (matplotlib, base64), then the samples side by side: prompt, reference, base,
tuned. Every text from the data or the model is escaped (html.escape)."""

from __future__ import annotations

import base64
import html
import io

PROMPT_CHARS = 1500  # a prompt longer than this is shown cut (generations.jsonl holds it whole)
BASE_COLOR, TUNED_COLOR = "#9aa5b1", "#2f6fdf"

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1200px;
       color: #1d2430; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.what { color: #4a5566; margin: 0 0 16px; } .what code { font-size: 12px; }
table { border-collapse: collapse; }
table.figures td, table.figures th { padding: 3px 14px; text-align: right; border-bottom: 1px solid #e3e7ec; }
table.figures td:first-child, table.figures th:first-child { text-align: left; }
table.samples { width: 100%; table-layout: fixed; }
table.samples th, table.samples td { border: 1px solid #d7dce2; padding: 6px 8px; vertical-align: top;
       text-align: left; white-space: pre-wrap; word-wrap: break-word; font-size: 13px; }
table.samples th { background: #f2f4f7; } table.samples .n { width: 2.5em; color: #6b7685; }
td.ok { background: #e8f6ec; } td.miss { background: #fbeaea; }
.cut { color: #6b7685; font-style: italic; } .chart { margin: 12px 0; max-width: 100%; }
ul { padding-left: 20px; } li { margin: 2px 0; } .small { font-size: 12px; color: #4a5566; }
"""


def chart_png(result: dict) -> bytes | None:
    """Base vs tuned as bars: the shares (%) in one panel, the loss in another. None when there is no figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qtune.evaluation import FIGURES

    tuned, base = result["tuned"], result.get("base")
    shares = [(label + (" ×100" if kind == "score" else ""), key) for key, label, kind in FIGURES
              if kind in ("pct", "score") and key in tuned and key != "reward_margin"]  # fmt: skip
    losses = [(label, key) for key, label, kind in FIGURES if key == "loss" and key in tuned]
    panels = [p for p in ((shares, "share (%)"), (losses, "held-out loss (lower is better)")) if p[0]]
    if not panels:
        return None
    widths = [max(2, len(p[0])) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3.8), gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (items, ylabel) in zip(axes[0], panels, strict=True):
        scale = 1.0 if items is losses else 100.0
        sides = [("base", base, BASE_COLOR)] if base is not None else []
        sides.append(("tuned", tuned, TUNED_COLOR))
        width = 0.8 / len(sides)
        for s, (name, figures, color) in enumerate(sides):
            xs = [i + (s - (len(sides) - 1) / 2) * width for i in range(len(items))]
            values = [(figures.get(key) or 0.0) * scale for _, key in items]
            bars = ax.bar(xs, values, width * 0.95, label=name, color=color)
            for bar, value in zip(bars, values, strict=True):
                shown = f"{value:.1f}" if scale == 100 else f"{value:.3g}"
                ax.annotate(shown, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=8, xytext=(0, 2), textcoords="offset points")  # fmt: skip
        ax.set_xticks(range(len(items)), [label for label, _ in items], fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        if scale == 100:
            ax.set_ylim(0, 112)
        ax.spines[["top", "right"]].set_visible(False)
        if ax is axes[0][0]:
            ax.legend(fontsize=8, frameon=False, loc="upper left")
    fig.suptitle("base vs tuned" if base is not None else "tuned", fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _prompt_cell(record: dict) -> str:
    prompt = record.get("prompt")
    if isinstance(prompt, list):  # a conversation: one line per message
        text = "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in prompt)
    else:
        text = prompt or ""
    if len(text) > PROMPT_CHARS:
        return f'{_e(text[:PROMPT_CHARS])}<span class="cut"> … ({len(text):,} characters)</span>'
    return _e(text)


def _answer_cell(record: dict, side: str) -> str:
    if side not in record:
        return "<td></td>"
    match = record.get(f"{side}_exact_match")
    css = "" if match is None else ' class="ok"' if match else ' class="miss"'
    return f"<td{css}>{_e(record[side])}</td>"


def render_report(result: dict, records: list[dict]) -> str:
    """The whole page as one string."""
    from qtune.evaluation import FIGURES, figure_rows

    with_base = result.get("base") is not None
    model, data = result["model"], result["data"]
    png = chart_png(result)
    rows = "".join(
        f"<tr><td>{_e(label)}</td>" + (f"<td>{_e(base)}</td>" if with_base else "") + f"<td>{_e(tuned)}</td></tr>"
        for _, label, base, tuned in figure_rows(result)
    )
    head = "<tr><th>figure</th>" + ("<th>base</th>" if with_base else "") + "<th>tuned</th></tr>"
    chart = (
        f'<img class="chart" alt="base vs tuned: {_e(", ".join(k for k, _, _, _ in figure_rows(result)))}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        if png
        else ""
    )
    samples = ""
    if records:
        columns = ["#", "prompt", "reference"] + (["base"] if with_base else []) + ["tuned"]
        body = []
        for r in records:
            cells = [
                f'<td class="n">{r["index"] + 1}</td>',
                f"<td>{_prompt_cell(r)}</td>",
                f"<td>{_e(r.get('reference'))}</td>",
            ]
            if with_base:
                cells.append(_answer_cell(r, "base"))
            cells.append(_answer_cell(r, "tuned"))
            body.append("<tr>" + "".join(cells) + "</tr>")
        samples = (
            f"<h2>Samples ({len(records)}, greedy)</h2>"
            '<table class="samples"><thead><tr>'
            + "".join(f'<th class="n">{c}</th>' if c == "#" else f"<th>{c}</th>" for c in columns)
            + "</tr></thead>"
            "<tbody>" + "".join(body) + "</tbody></table>"
        )
    labels = {key: label for key, label, _ in FIGURES}
    meaning = "".join(f"<li><b>{_e(labels.get(k, k))}</b>: {_e(v)}</li>" for k, v in result.get("meaning", {}).items())
    notes = "".join(f"<li>{_e(n)}</li>" for n in result.get("notes", []))
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in result.get("versions", {}).items() if v)
    command = f"<br><code>{_e(result['command'])}</code>" if result.get("command") else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>qtune eval: {_e(result['run_dir'])}</title><style>{STYLE}</style></head><body>"
        f"<h1>qtune eval: {_e(result['run_dir'])}</h1>"
        f'<p class="what">adapter <code>{_e(model["adapter"])}</code> ({_e(model["method"])}) on '
        f"<code>{_e(model['base'])}</code>, {_e(model['quantization'])}; {_e(data['rows'])} held-out "
        f"{_e(data['schema'])} rows: {_e(data['source'])}{command}</p>"
        f'<table class="figures"><thead>{head}</thead><tbody>{rows}</tbody></table>{chart}{samples}'
        + (f"<h2>What the figures are</h2><ul>{meaning}</ul>" if meaning else "")
        + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
        + f'<p class="small">{versions}</p></body></html>\n'
    )
