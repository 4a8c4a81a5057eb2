"""Small server-side SVG charts (no JavaScript, no library): the dashboard's and the report's.

    svg = line_chart([0, 3, 5, 2], ticks=[(0, "14:00"), (2, "14:02")], title="files per minute")
    svg = bar_chart([("cat", 120), ("dog", 97)], title="label mix")
    svg = histogram_chart([0.51, 0.97, 0.88], bins=10, title="confidence")

Each returns one ``<svg>`` element as text; every label is XML-escaped, so hostile names are
safe to embed in a page. Sizes are in the viewBox; CSS scales the picture.
"""
from __future__ import annotations

from html import escape
from typing import Sequence

W, H = 640, 200
PAD_L, PAD_R, PAD_T, PAD_B = 44, 12, 26, 30
PALETTE = ("#2e86de", "#e67e22", "#8e44ad", "#16a085", "#c0392b", "#7f8c8d")
LABEL_COLORS = {"cat": "#2e86de", "dog": "#e67e22", "uncertain": "#8e44ad", "error": "#c0392b"}


def _frame(title: str, body: list[str], ymax: float) -> str:
    top = f"{ymax:g}" if ymax < 1000 else f"{ymax:.3g}"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" class="chart" '
        f'role="img" aria-label="{escape(title)}">',
        f'<text x="{PAD_L}" y="16" class="chart-title">{escape(title)}</text>',
        f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}" '
        'stroke="#999" stroke-width="1"/>',
        f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}" stroke="#999" '
        'stroke-width="1"/>',
        f'<text x="{PAD_L - 4}" y="{PAD_T + 4}" text-anchor="end" class="chart-axis">'
        f'{escape(top)}</text>',
        f'<text x="{PAD_L - 4}" y="{H - PAD_B}" text-anchor="end" class="chart-axis">0</text>',
        *body, "</svg>"]
    return "".join(parts)


def _nice_max(values: Sequence[float]) -> float:
    top = max([0.0, *values])
    if top <= 0:
        return 1.0
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10_000):
        if top <= step:
            return float(step)
    return float(top)


def line_chart(values: Sequence[float], ticks: Sequence[tuple[int, str]] = (), *, title: str = "",
               color: str = PALETTE[0]) -> str:
    """A filled line of ``values`` over equal steps; ``ticks`` = ``(position, label)``."""
    n = max(1, len(values))
    ymax = _nice_max(values)
    iw, ih = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    x = lambda i: PAD_L + (iw * i / (n - 1) if n > 1 else iw / 2)  # noqa: E731
    y = lambda v: PAD_T + ih * (1 - v / ymax)  # noqa: E731
    pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
    body = []
    if len(values) == 1:                  # one point: a dot, not an invisible line
        body.append(f'<circle cx="{x(0):.1f}" cy="{y(values[0]):.1f}" r="3" fill="{color}"/>')
    elif values:
        area = f"{x(0):.1f},{H - PAD_B} {pts} {x(n - 1):.1f},{H - PAD_B}"
        body += [f'<polygon points="{area}" fill="{color}" fill-opacity="0.15"/>',
                 f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>']
    for i, label in ticks:
        body.append(f'<text x="{x(i):.1f}" y="{H - PAD_B + 16}" text-anchor="middle" '
                    f'class="chart-axis">{escape(str(label))}</text>')
    return _frame(title, body, ymax)


def bar_chart(items: Sequence[tuple[str, float]], *, title: str = "",
              colors: dict[str, str] | None = None) -> str:
    """One bar per ``(label, value)``, value written above it; ``colors``: label -> color."""
    n = max(1, len(items))
    ymax = _nice_max([v for _, v in items])
    iw, ih = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    slot = iw / n
    body = []
    for i, (label, value) in enumerate(items):
        h = ih * value / ymax
        fill = escape((colors or {}).get(label, PALETTE[i % len(PALETTE)]))
        bx = PAD_L + i * slot + slot * 0.15
        body += [
            f'<rect x="{bx:.1f}" y="{PAD_T + ih - h:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{h:.1f}" fill="{fill}"/>',
            f'<text x="{bx + slot * 0.35:.1f}" y="{PAD_T + ih - h - 3:.1f}" text-anchor="middle" '
            f'class="chart-value">{escape(f"{value:g}")}</text>',
            f'<text x="{bx + slot * 0.35:.1f}" y="{H - PAD_B + 16}" text-anchor="middle" '
            f'class="chart-axis">{escape(str(label)[:24])}</text>']
    return _frame(title, body, ymax)


def histogram_chart(values: Sequence[float], bins: int = 10, lo: float = 0.0, hi: float = 1.0, *,
                    title: str = "") -> str:
    """Counts of ``values`` in ``bins`` equal bins over ``[lo, hi]``."""
    counts = [0] * bins
    for v in values:
        if v is None:
            continue
        k = int((v - lo) / (hi - lo) * bins)
        counts[min(bins - 1, max(0, k))] += 1
    items = [(f"{lo + (hi - lo) * k / bins:.1f}", c) for k, c in enumerate(counts)]
    return bar_chart(items, title=title)
