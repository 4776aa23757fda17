"""Expected Attention's scorer: the attention future queries are expected to pay each key, in closed form."""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention.rope import mean_rotation, unrotate
from ..core.context import LayerContext, Rope


def expected_attention_scores(
    ctx: LayerContext,
    rope: Rope | None,
    *,
    n_future: int = 512,
    n_sink: int = 4,
    use_covariance: bool = True,
    use_vnorm: bool = True,
    epsilon: float = 0.0,
) -> Tensor:
    """``(B, H_kv, T)`` expected attention of future queries, per KV head.

    Per query head, the pre-rotation queries of the prompt (its first ``n_sink`` real tokens left out) give a mean
    ``μ`` and covariance ``Σ`` (divided by ``n``); ``R̄`` is the rotation averaged over the next ``n_future``
    positions of each sequence; with ``μ̄ = R̄μ``, ``Σ̄ = R̄ΣR̄ᵀ`` and the softmax scale ``c``, each key after the sinks
    gets ``z_j = c μ̄·k_j + c²/2 · k_jᵀΣ̄k_j``; ``softmax_j(z)``, averaged over the query heads of the KV head, times
    ``‖v_j‖₂`` (after adding ``epsilon``). The sinks and padding score 0 (the method protects the sinks).
    """
    B, _, Lq, D = ctx.queries.shape
    Hkv, T, G = ctx.num_kv_heads, ctx.length, ctx.group
    out = torch.zeros(B, Hkv, T)
    pos_all = ctx.positions  # (B, T) true positions
    inv = None if rope is None else torch.tensor(rope.inv_freq, dtype=torch.float64)
    scale = 1.0 if rope is None else rope.scaling
    c = float(ctx.scaling)
    for b in range(B):
        real = ctx.selectable[b] & (pos_all[b] >= n_sink)  # (T,) keys scored and queries counted
        qreal = real[T - Lq :]
        if not bool(qreal.any()) or not bool(real.any()):
            continue
        q = ctx.queries[b][:, qreal].double()  # (H_q, m, D) post-rotation
        if inv is not None:
            q = unrotate(q, pos_all[b, T - Lq :][qreal], inv, scale)
        mu = q.mean(1)  # (H_q, D)
        n = int(ctx.selectable[b].sum())
        if inv is not None:
            R = mean_rotation(torch.arange(n, n + n_future), inv, D, scale)
            mu = mu @ R.T
        k = ctx.keys[b][:, real].double().repeat_interleave(G, 0)  # (H_q, m_k, D)
        z = c * torch.einsum("hd,hkd->hk", mu, k)
        if use_covariance:
            centred = q - q.mean(1, keepdim=True)
            cov = centred.transpose(1, 2) @ centred / q.shape[1]  # (H_q, D, D)
            if inv is not None:
                cov = R @ cov @ R.T
            z = z + c * c / 2 * torch.einsum("hkd,hde,hke->hk", k, cov, k)
        s = torch.softmax(z, dim=-1).reshape(Hkv, G, -1).mean(1)  # (H_kv, m_k)
        if use_vnorm:
            s = (s + epsilon) * ctx.values[b][:, real].double().norm(dim=-1)
        out[b][:, real] = s.float()
    return out
