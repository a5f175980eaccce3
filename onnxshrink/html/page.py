"""The HTML shell shared by run reports and the batch index: one file, inline CSS, no scripts.

Every value that comes from a model or a report is escaped here, at the last moment; only markup
this package builds itself is wrapped in `Raw`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1100px;padding:0 16px;color:#111827;background:#fff}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb}
h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{padding:3px 10px;border-bottom:1px solid #e5e7eb;text-align:right;vertical-align:top}
th{background:#f3f4f6}td.l,th.l{text-align:left}
.meta{color:#4b5563}.badge{padding:1px 8px;border-radius:9px;color:#fff;font-weight:600}
.passed,.ok{background:#15803d}.missed{background:#b45309}.failed,.bad{background:#b91c1c}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figcaption{font-size:12px;color:#4b5563}
svg.chart{font-family:inherit;background:#fafafa;border:1px solid #e5e7eb}
details{margin:4px 0}code{font-size:12px}
"""


class Raw(str):
    """Markup built by this package: inserted as is, never escaped again."""


def cell(value: object) -> str:
    """A table cell's content: `Raw` markup as is, anything else escaped."""
    if isinstance(value, Raw):
        return value
    return escape("" if value is None else str(value))


def table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, left: int = 1, cls: str = ""
) -> Raw:
    """A table whose first `left` columns are left-aligned (names), the rest numbers."""
    head = "".join(
        f'<th class="{"l" if i < left else ""}">{escape(h)}</th>' for i, h in enumerate(headers)
    )
    body = []
    for row in rows:
        tds = "".join(
            f'<td class="{"l" if i < left else ""}">{cell(v)}</td>' for i, v in enumerate(row)
        )
        body.append(f"<tr>{tds}</tr>")
    return Raw(
        f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def badge(status: str) -> Raw:
    """A coloured status label (passed / missed / failed / ok / bad)."""
    return Raw(f'<span class="badge {escape(status)}">{escape(status)}</span>')


def link(href: str, text: str) -> Raw:
    """A relative link (the caller quotes the URL)."""
    return Raw(f'<a href="{escape(href)}">{escape(text)}</a>')


def document(title: str, body: Iterable[str]) -> str:
    """A complete, self-contained HTML5 document."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def fmt_bytes(n: float | None) -> str:
    """Human-readable bytes (binary units)."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{int(n)} B"
    if abs(n) < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    if abs(n) < 1 << 30:
        return f"{n / (1 << 20):.2f} MiB"
    return f"{n / (1 << 30):.2f} GiB"


def fmt_ratio(before: float | None, after: float | None) -> str:
    """after/before as ``0.250x``; ``-`` when either side is missing or zero."""
    if not before or after is None:
        return "-"
    return f"{after / before:.3f}x"


def fmt_num(value: object, digits: int = 4) -> str:
    """A metric with `digits` significant digits (non-numbers as they are)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}g}"
    return str(value)


def fmt_value(value: object) -> str:
    """A statistic for a table cell: short floats, list sizes instead of long lists."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return (
            f"[{len(value)} values]" if len(value) > 6 else ", ".join(fmt_value(v) for v in value)
        )
    if isinstance(value, dict):
        return "; ".join(f"{k}={fmt_value(v)}" for k, v in value.items())
    return str(value)
