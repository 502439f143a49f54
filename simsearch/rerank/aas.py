"""Aligned Attention Score (DiffSim, Song et al.).

AAS(A->B) = cos( vec(Attn(Q_A, K_B, V_B)), vec(Attn(Q_A, K_A, V_A)) ): A's queries read B's keys
and values; if B carries the same appearance, the output barely changes. One cosine over the whole
flattened tensor; the symmetric score is the mean of both directions. Works on the self-attention of
any transformer block (SD UNet in the paper; DINOv2 here by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, all (..., H, T, d)."""
    return F.scaled_dot_product_attention(q, k, v)


def _flat_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine of flattened (M, ...) and (1|M, ...) -> (M,). F.cosine_similarity on an expanded
    operand is 5-25x slower on CPU than this."""
    x, y = x.flatten(1).float(), y.flatten(1).float()
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-8)


def aas_directed(q_a: torch.Tensor, k_a: torch.Tensor, v_a: torch.Tensor,
                 k_b: torch.Tensor, v_b: torch.Tensor, self_out: torch.Tensor | None = None) -> torch.Tensor:
    """AAS(A->B) for a batch of pairs. All (M, H, T, d) (A broadcast if M=1) -> (M,).
    `self_out` = attend(q_a, k_a, v_a) when the caller already has it."""
    if self_out is None:
        self_out = attend(q_a, k_a, v_a)  # (1|M, H, Ta, d)
    cross_out = attend(q_a.expand(k_b.shape[0], -1, -1, -1), k_b, v_b)  # (M, H, Ta, d)
    return _flat_cos(cross_out, self_out)


def aligned_attention_score(qkv_a: tuple[torch.Tensor, ...], qkv_b: tuple[torch.Tensor, ...],
                            self_a: torch.Tensor | None = None, self_b: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric AAS between one image A (q, k, v each (1, H, T, d)) and M candidates B
    (each (M, H, T, d)) -> (M,) in [-1, 1]."""
    q_a, k_a, v_a = qkv_a
    q_b, k_b, v_b = qkv_b
    a_to_b = aas_directed(q_a, k_a, v_a, k_b, v_b, self_a)
    b_to_a = aas_directed(q_b, k_b, v_b, k_a.expand_as(k_b), v_a.expand_as(v_b), self_b)
    return 0.5 * (a_to_b + b_to_a)
