"""KVzip's scorer: how much the model needs each cached entry to repeat the context it was given."""

from __future__ import annotations

import torch
from torch import Tensor


def reconstruction_scores(
    q: Tensor, k_sink: Tensor, k_chunk: Tensor, k_pass: Tensor, scaling: float, block: int = 256
) -> Tensor:
    """Largest attention any reconstruction query pays each entry of the chunk it repeats.

    One sequence: q ``(H_q, N, D)`` the repeat pass's queries; keys ``(H_kv, ·, D)``: the protected first tokens, the
    chunk being repeated and the pass's own tokens. The softmax runs over exactly these keys (the other chunks of the
    context are left out), causal inside the pass. Returns ``(H_kv, chunk)``: ``max over the pass queries and the
    query heads of each KV head``. Queries are taken ``block`` at a time, so no ``N × (S + C + N)`` matrix per head.
    """
    Hq, N, D = q.shape
    Hkv = k_chunk.shape[0]
    G = Hq // Hkv
    keys = torch.cat([k_sink, k_chunk, k_pass], dim=1).float()  # (H_kv, S + C + N, D)
    S, C = k_sink.shape[1], k_chunk.shape[1]
    qg = q.float().reshape(Hkv, G, N, D)
    out = torch.zeros(Hkv, C)
    key_pass = torch.arange(N)[None, :]
    for s in range(0, N, block):
        e = min(N, s + block)
        logits = torch.einsum("hgnd,hkd->hgnk", qg[:, :, s:e], keys) * scaling  # (H_kv, G, n, S + C + N)
        causal = key_pass <= torch.arange(s, e)[:, None]  # (n, N): a pass query sees the pass up to itself
        allowed = torch.cat([torch.ones(e - s, S + C, dtype=torch.bool), causal], dim=1)
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        out = torch.maximum(out, probs[..., S : S + C].amax(dim=(1, 2)))
    return out  # (H_kv, C)
