"""Self-contained HTML result pages for `simsearch query --html`."""

from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .descriptors.facets import merge_heads
from .rerank.correspondence import DenseDescriptors, best_buddies
from .viz import draw_matches, image_data_uri, table_html, write_page


def _key_grid(backbone, layer, dense: np.ndarray, image_size: tuple[int, int], input_size: int) -> DenseDescriptors:
    """Key-facet descriptors of a stored attention source, placed on an image of `image_size`."""
    keys = merge_heads(backbone.attention_keys(layer, torch.as_tensor(dense)[None])[0])[0, backbone.prefix_tokens:]
    h, w = backbone.patch_grid(len(keys) + backbone.prefix_tokens)
    cell = input_size // w
    return DenseDescriptors(desc=keys.float().cpu(), saliency=torch.ones(len(keys)), grid=(h, w), stride=cell,
                            patch=cell, input_size=input_size, image_size=image_size)


@torch.inference_mode()
def match_picture(index, query_dense: np.ndarray, query_image: Image.Image, hit_dense: np.ndarray,
                  hit_image: Image.Image, n_matches: int = 8, height: int = 160) -> Image.Image:
    """The query and a hit side by side with their best-buddy correspondences, found on the key facet
    of the stored dense layer (query_dense, hit_dense: (T, C) hidden states entering that block)."""
    bb, layer, size = index.embedder.backbone, index.conf.dense_layer, index.conf.image_size
    q_grid = _key_grid(bb, layer, query_dense, query_image.size, size)
    h_grid = _key_grid(bb, layer, hit_dense, hit_image.size, size)
    pairs, sim = best_buddies(q_grid.desc, h_grid.desc, q_grid.saliency, h_grid.saliency, n=n_matches)
    rc = lambda idx, w: torch.stack([idx // w, idx % w], 1)  # noqa: E731
    return draw_matches(query_image, hit_image, q_grid.cell_to_xy(rc(pairs[:, 0], q_grid.grid[1])),
                        h_grid.cell_to_xy(rc(pairs[:, 1], h_grid.grid[1])), sim.numpy(), height=height)


@torch.inference_mode()
def write_results_html(index, query: str | Path, hits, path: str | Path, mode: str, n_matches: int = 8) -> Path:
    """Query, hits with thumbnails and scores, and each hit's correspondences to the query."""
    from .images import open_image

    q_img = open_image(Path(query), max_side=512).image
    q_thumb = q_img.copy()
    q_thumb.thumbnail((256, 256))
    q_dense = index.embed_image(q_img).dense[0]
    rows_by_key = index.store.find([h.key for h in hits], ["thumb"])
    hits = [h for h in hits if h.key in rows_by_key]
    dense = index.dense([h.key for h in hits]) if hits else []
    score_names = list(hits[0].scores) if hits and hits[0].scores else []
    rows = []
    for hit, hit_dense in zip(hits, dense):
        thumb = Image.open(io.BytesIO(rows_by_key[hit.key]["thumb"])).convert("RGB")
        pic = match_picture(index, q_dense, q_thumb, hit_dense, thumb, n_matches)
        rows.append([str(hit.rank), f"{hit.score:.4f}", *[f"{hit.scores[n]:.4f}" for n in score_names],
                     f'<img alt="hit {hit.rank}" src="{image_data_uri(thumb)}">',
                     f'<img alt="matches {hit.rank}" src="{image_data_uri(pic)}">',
                     f'<span class="path">{html.escape(hit.path)}</span>'])
    headers = ["rank", "score", *[n.replace("_", " ") for n in score_names], "image", "correspondences with the query", "path"]
    query_html = (f'<div class="query"><p>query: <span class="path">{html.escape(str(query))}</span> '
                  f'({mode}, {len(hits)} hits, model {html.escape(index.conf.model)})</p>'
                  f'<img alt="query" src="{image_data_uri(q_thumb)}"></div>')
    numeric = set(range(2 + len(score_names)))
    return write_page(path, f"simsearch: {Path(query).name}", [query_html, table_html(headers, rows, numeric)])


def write_dedup_html(index, result, path: str | Path, other=None, title: str | None = None) -> Path:
    """Duplicate groups as a gallery: per group its members' stored thumbnails, the one to keep
    first, each with its role, verified score, inliers, the thumbnails' agreement, reclaimable bytes and path. `other`: the
    reference Index of a set-against-set result (members of set "ref")."""
    stores = {"self": index.store, "ref": (other or index).store}
    thumbs: dict[tuple[str, int], bytes] = {}
    for name, store in stores.items():
        keys = [m.key for g in result.groups for m in g.members if m.set == name]
        thumbs |= {(name, k): r["thumb"] for k, r in store.find(keys, ["thumb"]).items()} if keys else {}
    sections = [f"<p>{len(result.groups)} groups, {result.reclaimable_bytes:,} bytes reclaimable, "
                f"{result.pairs_verified} verified pairs, threshold {result.threshold:g}, agreement from "
                f"{result.min_agreement:g}, table version "
                f"{result.table_version}. Nothing was deleted or moved.</p>"]
    for g in result.groups:
        cells = []
        for m in g.members:
            data = thumbs.get((m.set, m.key))
            img = f'<img alt="{html.escape(m.role)}" src="{image_data_uri(data)}">' if data else "(no thumbnail)"
            where = " (reference)" if m.set == "ref" else ""
            cells.append(f'<figure class="{html.escape(m.role)}">{img}<figcaption><b>{html.escape(m.role)}</b>{where}'
                         f"<br>score {m.score:.3f} · {m.inliers} inliers · agreement {m.agreement:.2f} · {m.bytes:,} B<br>"
                         f'<span class="path">{html.escape(m.path)}</span></figcaption></figure>')
        sections.append(f'<section><h2>group {g.group} · {g.reclaimable_bytes:,} B reclaimable</h2>'
                        f'<div class="group">{"".join(cells)}</div></section>')
    style = ("<style>.group { display: flex; flex-wrap: wrap; gap: 12px; } figure { margin: 0; width: 200px; } "
             "figure.keep { outline: 3px solid #2a2; } figcaption { font-size: 12px; } h2 { font-size: 16px; }</style>")
    return write_page(path, title or f"simsearch: duplicates in {index.root}", [style, *sections])
