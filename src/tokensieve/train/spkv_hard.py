"""SP-KV's hard-gate stage (``tokensieve train spkv --hard-steps N``): fine-tune the write gate end to end through the
frozen model with the gate *hard*, as it acts at inference, and a straight-through gradient.

The paper (arXiv:2605.14037) trains its utility predictor jointly with the model on the next-token loss, so that the
gate's threshold decisions at inference match what training saw; its abstract gives no more (how the soft/hard gap is
closed — a straight-through estimator, annealing, a hard-concrete relaxation — is UNVERIFIED). Our stage, on the
frozen model, after the oracle fit (stage A, docs/SPKV.md):

* student attention of layer ``ℓ``, query ``t``, key ``j``: ``a_tj ∝ p_tj · G_tj`` with ``p = softmax(q kᵀ/√D)``
  (causal) and ``G_tj = 1`` while ``t − j < w``, else ``g_j = m_j + u_j − sg(u_j)``, ``m_j = [u_j ≥ τ]`` (the hard
  decision in the forward pass, the gradient of ``u`` in the backward pass: straight-through), ``u_j`` the gate's
  utility of key ``j`` for the query's KV head. Renormalising over the kept keys is exactly the attention of the
  evicted cache, so the forward pass is what inference computes;
* loss: ``KL(teacher ‖ student)`` of the next-token distributions (teacher: the same frozen model with its full
  attention) + ``λ · (mean over out-of-window keys of g − ρ)²`` — the frozen model needs the density term, or closing
  any gate can only raise the KL (``u ≡ 1`` reproduces the teacher); ``ρ = --hard-density``, ``λ = --hard-weight``;
* AdamW on the gate only (``--hard-lr``), one training sequence per step, checkpointed (``OUT/hard.pt``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..attention.rope import unrotate
from ..core.context import ModelShape

IMPLEMENTATION = "tokensieve_spkv_hard"


def gate_keep(u: Tensor, tau: float) -> Tensor:
    """Straight-through hard gate: ``[u ≥ τ]`` in value, the gradient of ``u``."""
    hard = (u >= tau).to(u.dtype)
    return hard + u - u.detach()


def gated_attention(q: Tensor, k: Tensor, v: Tensor, g: Tensor, window: int, scaling: float) -> Tensor:
    """``(B, H_q, T, D)`` causal attention in which key ``j`` counts with weight ``g_j`` ``(B, H_kv, T)`` for the
    queries it is at least ``window`` tokens before (and weight 1 inside the window). q ``(B, H_q, T, D)``, k/v
    ``(B, H_kv, T, D)``; one sequence per row, no padding."""
    _B, Hq, T, _D = q.shape
    G = Hq // k.shape[1]
    kk = k.repeat_interleave(G, dim=1)
    vv = v.repeat_interleave(G, dim=1)
    z = torch.einsum("bhqd,bhkd->bhqk", q.float(), kk.float()) * scaling
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    z = z.masked_fill(dist[None, None] < 0, float("-inf"))
    p = torch.softmax(z, dim=-1)
    gg = g.repeat_interleave(G, dim=1)[:, :, None, :]  # (B, Hq, 1, T)
    w = torch.where((dist < window)[None, None], torch.ones_like(p), gg.expand_as(p))
    a = p * w
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.einsum("bhqk,bhkd->bhqd", a, vv.float()).to(v.dtype)


class HardGateRun:
    """Routes a transformers model's attention through :func:`gated_attention` with a gate network's utilities, for
    the duration of :meth:`active` (registration with transformers' attention interface, restored afterwards)."""

    def __init__(self, model: Any, net: Any, shape: ModelShape, window: int, tau: float, source: str) -> None:
        self.model, self.net, self.shape = model, net, shape
        self.window, self.tau, self.source = window, tau, source
        self.hidden: dict[int, Tensor] = {}
        self.kept: list[Tensor] = []  # per layer: g of the out-of-window keys (for the density term)

    def _attend(self, module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:  # fmt: skip
        layer = int(module.layer_idx)
        T = key.shape[2]
        if self.source == "hidden":
            feats = self.hidden[layer]  # (B, T, d)
        else:
            pos = torch.arange(T)[None, :]
            rope = self.shape.rope_of(layer)
            kk = key.float()
            if rope is not None:
                inv = torch.tensor(rope.inv_freq, dtype=torch.float64)
                kk = unrotate(kk, pos[:, None, :], inv, rope.scaling).float()
            B, _H = kk.shape[:2]
            feats = torch.cat([kk, value.float()], -1).permute(0, 2, 1, 3).reshape(B, T, -1)
        u = torch.sigmoid(self.net.layer_logits(layer, feats)).permute(0, 2, 1)  # (B, H_kv, T)
        g = gate_keep(u, self.tau)
        if self.window < T:
            self.kept.append(g[..., : T - self.window].flatten())
        scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
        out = gated_attention(query, key, value, g, self.window, scale)
        return out.transpose(1, 2).contiguous(), None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(IMPLEMENTATION, self._attend)
        AttentionMaskInterface.register(IMPLEMENTATION, lambda *a, **k: None)
        before = self.model.config._attn_implementation
        self.model.set_attn_implementation(IMPLEMENTATION)

        def grab(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(h, Tensor):
                self.hidden[int(module.layer_idx)] = h

        from ..adapters.hf import attention_modules

        hooks = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in attention_modules(self.model).values()]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            self.model.set_attn_implementation(before)
            self.hidden.clear()


def student_loss(
    run: HardGateRun, ids: Tensor, teacher_logp: Tensor, density: float, weight: float
) -> tuple[Tensor, float, float]:
    """``(loss, KL, hard density)`` of one sequence ``ids`` ``(1, T)`` against the teacher's log-probabilities."""
    run.kept = []
    with run.active():
        logits = run.model(input_ids=ids, use_cache=False).logits.float()  # (1, T, V)
    logp = torch.log_softmax(logits, -1)
    kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()
    g = torch.cat(run.kept) if run.kept else torch.ones(1)
    share = g.mean()
    loss = kl + weight * (share - density) ** 2
    return loss, float(kl.detach()), float(share.detach())


def hard_gate_stage(trainer: Any, net: Any, sequences: list[list[int]]) -> Any:
    """Fine-tune ``net`` (a :class:`~tokensieve.methods.kv.spkv_gate.GateNet`, stage A's fit) for ``--hard-steps``
    steps; resumable from ``OUT/hard.pt``. Returns the net."""
    from tqdm import tqdm

    from ..adapters.models import model_shape

    c = trainer.cfg
    model, _ = trainer.model()
    model.requires_grad_(False)
    run = HardGateRun(model, net, model_shape(model), c.window, c.hard_tau, c.input)
    opt = torch.optim.AdamW(net.parameters(), lr=c.hard_lr, weight_decay=0.0)
    ckpt = trainer.out / "hard.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
    bar = tqdm(total=c.hard_steps, initial=start, desc="hard gate", disable=not trainer.progress)
    for s in range(start, c.hard_steps):
        ids = torch.tensor([sequences[s % len(sequences)]])
        with torch.no_grad():
            teacher = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
        for group in opt.param_groups:
            group["lr"] = c.hard_lr * 0.5 * (1 + math.cos(math.pi * s / c.hard_steps))
        with torch.enable_grad():
            loss, kl, share = student_loss(run, ids, teacher, c.hard_density, c.hard_weight)
            opt.zero_grad()
            loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(kl=f"{kl:.3f}", kept=f"{share:.2f}")
        trainer.log({"stage": "hard", "step": s + 1, "kl": round(kl, 5), "kept": round(share, 4)})
        if (s + 1) % max(1, c.checkpoint_every // 10) == 0 or s + 1 == c.hard_steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": s + 1}, tmp)
            tmp.rename(ckpt)
    bar.close()
    return net


__all__ = ["HardGateRun", "gate_keep", "gated_attention", "hard_gate_stage", "student_loss"]
