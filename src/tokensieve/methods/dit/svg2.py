"""Sparse VideoGen2: semantic-aware permutation — k-means on queries and keys, centroid top-p cluster selection.

Yang et al., "Sparse VideoGen2: Accelerate Video Generation with Sparse Attention via Semantic-Aware Permutation",
NeurIPS 2025 (arXiv:2505.18875); checked against the authors' code (svg-project/Sparse-VideoGen,
``svg/models/wan/attention.py`` ``WanAttn_SAPAttn_Processor`` and ``svg/kmeans_utils.py``).

**Rule.** Per (sequence, head): queries are clustered into ``qc`` clusters and keys into ``kc`` clusters by Euclidean
k-means (the first sparse call of a run starts from ``qc``/``kc`` random tokens and iterates up to 50 times; later
calls start from the layer's previous centroids and iterate twice; an iteration stops early when no centroid moves
more than 1e-4). Cluster ``a`` of queries reads cluster ``b`` of keys when ``b`` is among the key clusters that, sorted
by the *size-weighted softmax* of centroid scores ``|b| · exp(c_a · c_b / √D)`` (normalised over ``b``), reach a
cumulative probability ``top_p`` (the cluster that crosses ``top_p`` included); at least ``min_kc_ratio · kc`` clusters
are always kept. Queries and keys are permuted so that each cluster is contiguous, attended exactly over the chosen
(query-cluster, key-cluster) pairs, and the output is permuted back.

**Defaults** as the authors' Wan 2.1 text-to-video script (``scripts/wan/wan_t2v_720p_sap.sh``): ``qc = 300``,
``kc = 1000``, ``top_p = 0.9``, ``min_kc_ratio = 0.1``, 50 initial and 2 warm-started iterations, the first 20 % of
the steps and 3 % of the layers dense. Cluster counts above the number of tokens are capped at it.

**Choices.** The clusters are variable in size; like the authors' kernel (FlashInfer's variable-block sparse
attention), ours reads exactly the chosen cluster pairs: per (sequence, head, query cluster), one dense attention call
(SDPA) of the cluster's queries over the keys of its chosen key clusters (and every text key, in joint attention), so
the work is the density's and no token mask is evaluated. The random initial centroids come from a generator seeded
by the layer, one draw per head shared by the sequences of a batch (the authors draw from the global generator), and
k-means stops per (sequence, head), so a batch gives every sequence what it gets alone. The density is the exact
fraction of pairs read. The official cluster counts are set for ~75,000-token videos (one key cluster per ~75
tokens); on a small video give fewer (``svg2[qc=8,kc=32]`` at 2,048 tokens keeps that ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.registry import register
from ...errors import ConfigError
from .base import Attended, DiTCall, DiTMethod


def kmeans(
    x: Tensor, k: int, iters: int, init: Tensor | None = None, tol: float = 1e-4, seed: int = 0, group: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Batched Euclidean k-means as ``batch_kmeans_Euclid``: x ``(R, N, D)`` → labels ``(R, N)``, centroids
    ``(R, k, D)``, sizes ``(R, k)``. An empty cluster keeps its previous centroid. Rows stop one by one when no centroid
    of theirs moves more than ``tol`` (the authors stop the whole batch on its largest move: a batch would then depend
    on its other sequences). Random initial tokens are drawn for ``group`` rows and repeated over the rest (one draw per
    head, the same for every sequence of a batch)."""
    R, N, D = x.shape
    x = x.float()
    if init is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        idx = torch.randint(0, N, (group, k), generator=gen).to(x.device).repeat(R // group, 1)
        cent = torch.gather(x, 1, idx[..., None].expand(R, k, D))
    else:
        cent = init.float()
    x_sq = (x * x).sum(-1)  # (R, N)
    labels = torch.zeros(R, N, dtype=torch.long, device=x.device)
    sizes = torch.zeros(R, k, device=x.device)
    moving = torch.ones(R, dtype=torch.bool, device=x.device)
    for _ in range(max(iters, 1)):
        dist = x_sq[..., None] + (cent * cent).sum(-1)[:, None, :] - 2 * torch.matmul(x, cent.transpose(1, 2))
        new_labels = dist.argmin(-1)
        labels = torch.where(moving[:, None], new_labels, labels)
        sums = torch.zeros(R, k, D, device=x.device).scatter_add_(1, labels[..., None].expand(R, N, D), x)
        sizes = torch.zeros(R, k, device=x.device).scatter_add_(1, labels, torch.ones(R, N, device=x.device))
        new = torch.where(sizes[..., None] > 0, sums / sizes.clamp(min=1)[..., None], cent)
        shift = (new - cent).norm(dim=-1).amax(-1)  # (R,)
        cent = torch.where(moving[:, None, None], new, cent)
        moving = moving & (shift >= tol)
        if not bool(moving.any()):
            break
    return labels, cent, sizes


def dynamic_map(q_cent: Tensor, k_cent: Tensor, k_sizes: Tensor, top_p: float, min_kc_ratio: float) -> Tensor:
    """``(..., qc, kc)`` bool: the key clusters each query cluster reads (``identify_dynamic_map``)."""
    D = q_cent.shape[-1]
    scores = torch.matmul(q_cent.float(), k_cent.float().transpose(-1, -2)) / D**0.5
    w = k_sizes.float()[..., None, :]
    e = w * torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = e / e.sum(-1, keepdim=True).clamp(min=1e-12)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    remove = torch.cumsum(sorted_p, -1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    keep_n = int(min_kc_ratio * k_cent.shape[-2])
    if keep_n > 0:
        remove[..., :keep_n] = False
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, ~remove)


@register
@dataclass(frozen=True)
class SparseVideoGen2(DiTMethod):
    """Sparse VideoGen2: semantic-aware permutation — k-means on queries and keys, centroid top-p cluster selection.

    The module docstring states the rule, the code it was checked against and the defaults.
    """

    name: ClassVar[str] = "svg2"
    paper: ClassVar[str] = "Yang et al., Sparse VideoGen2, NeurIPS 2025 (arXiv:2505.18875)"
    rule: ClassVar[str] = (
        "k-means clusters of queries and keys; key clusters by size-weighted centroid softmax to top-p"
    )

    qc: int = 300
    kc: int = 1000
    top_p: float = 0.9
    min_kc_ratio: float = 0.1
    iters_init: int = 50
    iters_step: int = 2
    warmup: float = 0.2
    dense_layers: float = 0.03

    @classmethod
    def summary(cls) -> str:
        return "diffusion transformer: sparse self-attention per call (bidirectional, exact query-key cluster pairs)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qc < 1 or self.kc < 1 or not 0 < self.top_p <= 1 or not 0 <= self.min_kc_ratio <= 1:
            raise ConfigError("svg2: qc, kc ≥ 1, top_p in (0, 1], min_kc_ratio in [0, 1].")

    def clusters(self, call: DiTCall) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Labels and centroids of queries and keys, warm-started from the layer's previous call."""
        B, H, N, D = call.q.shape
        qc, kc = min(self.qc, N), min(self.kc, N)
        prev = call.state.get("centroids")
        if prev is not None and prev[0].shape[0] != B * H:
            prev = None
        iters = self.iters_init if prev is None else self.iters_step
        ql, qcent, _ = kmeans(
            call.q.reshape(B * H, N, D), qc, iters, None if prev is None else prev[0], seed=2 * call.layer, group=H
        )
        kl, kcent, ksz = kmeans(
            call.k.reshape(B * H, N, D), kc, iters, None if prev is None else prev[1], seed=2 * call.layer + 1, group=H
        )
        call.state["centroids"] = (qcent, kcent)
        return (
            ql.view(B, H, N),
            kl.view(B, H, N),
            qcent.view(B, H, qc, D),
            kcent.view(B, H, kc, D),
            ksz.view(B, H, kc),
        )

    def sparse(self, call: DiTCall) -> Attended:
        ql, kl, qcent, kcent, ksz = self.clusters(call)
        pairs = dynamic_map(qcent, kcent, ksz, self.top_p, self.min_kc_ratio)  # (B, H, qc, kc)
        out, read = cluster_attention(call, ql, kl, pairs)
        B, H, N, _D = call.q.shape
        return Attended(out, read / (B * H * N * N))


def cluster_attention(call: DiTCall, ql: Tensor, kl: Tensor, pairs: Tensor) -> tuple[Tensor, int]:
    """Exact attention of every query cluster over its chosen key clusters: ``(B, H, N, D)`` and the number of video
    query-key pairs read. ``ql``/``kl`` ``(B, H, N)`` cluster labels, ``pairs`` ``(B, H, qc, kc)`` bool."""
    q, k, v = call.q, call.k, call.v
    B, H = q.shape[:2]
    out = torch.empty_like(q)
    read = 0
    tk, tv = call.text_k, call.text_v
    for b in range(B):
        for h in range(H):
            keys, values = k[b, h], v[b, h]
            keep = pairs[b, h][:, kl[b, h]]  # (qc, N): query cluster a reads key j
            if tk is not None and tv is not None:  # joint attention: every video query also reads every text key
                keys, values = torch.cat([keys, tk[b, h]]), torch.cat([values, tv[b, h]])
                keep = torch.cat([keep, keep.new_ones(keep.shape[0], tk.shape[2])], 1)
            qorder = torch.argsort(ql[b, h], stable=True)
            qsizes = torch.bincount(ql[b, h], minlength=pairs.shape[-2]).tolist()
            start = 0
            for a, n in enumerate(qsizes):
                if n == 0:
                    continue
                rows = qorder[start : start + n]
                ks, vs = keys[keep[a]], values[keep[a]]
                read += n * int(keep[a, : k.shape[2]].sum())
                # 4-D operands: SDPA's flash kernel on CPU (3-D ones take the slower math path)
                o = F.scaled_dot_product_attention(q[b, h, rows][None, None], ks[None, None], vs[None, None],
                                                   scale=call.scaling)  # fmt: skip
                out[b, h, rows] = o[0, 0]
                start += n
    return out, read
