"""Which poolings exist and how a style pooling parses: torch-free, so that a DescriptorConfig
validates without loading torch (a cold query never does)."""

from __future__ import annotations

import re

CONTENT_POOLINGS = ("cls", "mean", "cls+mean", "gem")
STYLE_POOLINGS = ("meanstd", "cov", "cov<k>")  # or several joined by + (style_parts)


def style_parts(pooling: str) -> list[tuple[str, int | None]]:
    """`meanstd`, `cov`, `cov<k>` or several joined by `+` -> [(kind, k)]; ValueError naming the choices."""
    parts = []
    for part in pooling.split("+"):
        m = re.fullmatch(r"(meanstd|cov)(\d*)", part)
        if not m or (m[1] == "meanstd" and m[2]) or (m[2] and int(m[2]) < 1) or part in dict(parts):
            raise ValueError(f"unknown style pooling '{pooling}' (choose from {', '.join(STYLE_POOLINGS)} with k "
                             "random directions, or several joined by +, e.g. meanstd+cov64)")
        parts.append((m[1], int(m[2]) if m[2] else None))
    return parts
