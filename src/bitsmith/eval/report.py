"""Plain-text tables of evaluation results."""

from __future__ import annotations

COLUMNS = (
    ("recipe", "recipe", "{}"),
    ("ppl", "ppl", "{:.3f}"),
    ("kl", "KL", "{:.4f}"),
    ("top1", "top-1", "{:.3f}"),
    ("bpw", "bpw", "{:.2f}"),
    ("size_mb", "MB", "{:.1f}"),
    ("quantize_seconds", "quant s", "{:.1f}"),
    ("tokens_per_s", "eval tok/s", "{:.0f}"),
    ("zeroshot_avg", "0-shot avg", "{:.3f}"),
)


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of ``rows``; columns nobody has are left out."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def protocol_line(report: dict) -> str:
    p = report["protocol"]
    s = f"text={p['text']} seq={p['seq']} windows={p['windows']}"
    if p.get("task_limit") is not None:
        s += f" task_limit={p['task_limit']}"
    return s
