"""Pictures a person reads at a glance: matches side by side, and self-contained HTML result pages."""

from __future__ import annotations

import base64
import colorsys
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(n: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.85, 1.0)) for i in range(n)]


def draw_matches(img_a: Image.Image, img_b: Image.Image, points_a: np.ndarray, points_b: np.ndarray,
                 confidence: np.ndarray | None = None, height: int = 384, gap: int = 12) -> Image.Image:
    """A and B side by side at the same height; match i is a numbered circle pair joined by a line
    of its own colour. Line width grows with confidence."""
    sa, sb = height / img_a.height, height / img_b.height
    wa, wb = round(img_a.width * sa), round(img_b.width * sb)
    canvas = Image.new("RGB", (wa + gap + wb, height), "white")
    canvas.paste(img_a.convert("RGB").resize((wa, height)), (0, 0))
    canvas.paste(img_b.convert("RGB").resize((wb, height)), (wa + gap, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    conf = np.ones(len(points_a)) if confidence is None else np.clip(np.asarray(confidence), 0, 1)
    r = max(4, height // 64)
    for i, (pa, pb, color) in enumerate(zip(points_a, points_b, palette(len(points_a)))):
        xa, ya = pa[0] * sa, pa[1] * sa
        xb, yb = pb[0] * sb + wa + gap, pb[1] * sb
        draw.line([(xa, ya), (xb, yb)], fill=color, width=1 + int(2 * conf[i]))
        for x, y in ((xa, ya), (xb, yb)):
            draw.ellipse([x - r, y - r, x + r, y + r], outline="black", fill=color, width=1)
            draw.text((x + r + 1, y - r - 1), str(i + 1), fill="white", font=font, stroke_width=1, stroke_fill="black")
    return canvas


def image_data_uri(img: Image.Image | bytes, fmt: str = "JPEG") -> str:
    if isinstance(img, bytes):
        data = img
    else:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format=fmt, quality=85)
        data = buf.getvalue()
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode()}"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; }} table {{ border-collapse: collapse; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 6px 10px; vertical-align: middle; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-height: 160px; }} .query img {{ max-height: 240px; }} .path {{ font-family: monospace; word-break: break-all; }}
</style></head><body>
<h1>{title}</h1>
{body}
</body></html>
"""


def write_page(path: str | Path, title: str, sections: list[str]) -> Path:
    """A self-contained page: every image is inlined as a data URI."""
    path = Path(path)
    path.write_text(PAGE.format(title=html.escape(title), body="\n".join(sections)), encoding="utf-8")
    return path


def table_html(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """rows hold ready HTML cells (escape text before)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                      for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
