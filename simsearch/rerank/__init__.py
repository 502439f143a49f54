"""Second-stage reranking of first-stage (FAISS) hits from what the index stored.

Candidates are never re-read from disk: their dense tensors (the source of `dense_layer`'s attention:
for a ViT the hidden state entering that block, for the UNet the input of that attention module) come
from the table, and the backbone's own projections turn them into attention inputs.

- aas:     Aligned Attention Score of that block's self-attention (DiffSim), symmetric.
- matches: share of the query's patches whose nearest neighbour (key facet) is mutual.
- both:    the two scores z-normalised over the candidate list and averaged, so neither dominates
           by scale; ties fall back to AAS.
"""

from __future__ import annotations

import numpy as np
import torch

from ..descriptors.facets import merge_heads
from .aas import aligned_attention_score
from .correspondence import mutual_nn_share

RERANKERS = ("aas", "matches", "both")


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


@torch.inference_mode()
def rerank_scores(backbone, layer, query_dense: np.ndarray, cand_dense: np.ndarray,
                  method: str = "both") -> dict[str, np.ndarray]:
    """query_dense (T, C), cand_dense (M, T, C): attention sources of `layer` as the index stores them.

    -> {"aas": (M,), "matches": (M,), "score": (M,) the sort key of `method`}; only what `method` needs.
    """
    if method not in RERANKERS:
        raise ValueError(f"unknown reranker '{method}' (choose from {', '.join(RERANKERS)})")
    qkv_a = backbone.attention_inputs(layer, torch.as_tensor(query_dense)[None])
    qkv_b = backbone.attention_inputs(layer, torch.as_tensor(cand_dense))
    out: dict[str, np.ndarray] = {}
    if method in ("aas", "both"):
        out["aas"] = aligned_attention_score(qkv_a, qkv_b).float().cpu().numpy()
    if method in ("matches", "both"):
        p = backbone.prefix_tokens
        keys_a = merge_heads(qkv_a[1])[0, p:]  # (N, C) patch keys, CLS and registers dropped
        keys_b = merge_heads(qkv_b[1])[:, p:]  # (M, N, C)
        out["matches"] = mutual_nn_share(keys_a.float(), keys_b.float()).cpu().numpy()
    out["score"] = out["aas"] if method == "aas" else out["matches"] if method == "matches" else \
        0.5 * (_zscore(out["aas"]) + _zscore(out["matches"])) + 1e-6 * out["aas"]
    return out
