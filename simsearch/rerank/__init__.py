"""Second-stage reranking of first-stage (FAISS) hits from what the index stored.

Candidates are never re-read from disk: their dense tensors (the source of `dense_layer`'s attention:
for a ViT the hidden state entering that block, for the UNet the input of that attention module) come
from the table, and the backbone's own projections turn them into attention inputs.

- verified: geometric verification of patch correspondences (rerank.verify): the share of the
            query's salient patches that map onto the candidate by one similarity transform.
            The default.
- aas:      Aligned Attention Score of that block's self-attention (DiffSim), symmetric.
- matches:  share of the query's patches whose nearest neighbour (key facet) is mutual.
- both:     aas and matches together.

Every reranker combines with the first stage instead of replacing it (`fuse`, rules in FUSION): a
second-stage score that says nothing cannot sink a correct first-stage hit.
"""

from __future__ import annotations

RERANKERS = ("verified", "aas", "matches", "both")
DEFAULT_RERANKER = "verified"  # what `rerank` means without a name


def __getattr__(name: str):
    """The scores themselves (rerank.scores) load torch: only when asked for, so that names and
    option checks stay cheap."""
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    scores = importlib.import_module(f"{__name__}.scores")
    try:
        return getattr(scores, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
