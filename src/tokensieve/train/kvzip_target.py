"""KVzip+'s target, shared by the learned gates' trainers (``tokensieve train kvzap``, ``tokensieve train spkv`` with
the KVzip+ target): the official "repeat the context" prompt and the log KVzip+ score of each original token."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.context import LayerContext

INSTRUCTION = "\n\nRepeat the previous context exactly."


def repeat_prompt(tokenizer: Any, text_ids: list[int]) -> tuple[list[int], tuple[int, int], tuple[int, int]]:
    """The official repeat prompt in ids — chat template of ``user: text + instruction`` / ``assistant: text`` — with
    both copies of the text the same ids; returns ``(ids, original span, repeated span)``."""
    a, b = "\x00ORIGINAL\x00", "\x00REPEATED\x00"
    messages = [{"role": "user", "content": a + INSTRUCTION}, {"role": "assistant", "content": b}]
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    else:
        rendered = a + INSTRUCTION + "\n" + b
    head, rest = rendered.split(a)
    middle, tail = rest.split(b)

    def enc(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []

    p, m, t = enc(head), enc(middle), enc(tail)
    s0 = len(p)
    s1 = s0 + len(text_ids) + len(m)
    ids = p + text_ids + m + text_ids + t
    return ids, (s0, s0 + len(text_ids)), (s1, s1 + len(text_ids))


def kvzip_plus(ctx: LayerContext, out_proj: Tensor, original: tuple[int, int], repeated: tuple[int, int],
               chunk: int = 256) -> Tensor:  # fmt: skip
    """``(H_kv, n)`` log KVzip+ scores of the original text's ``n`` tokens (one sequence, no padding; ``ctx.hidden``
    the layer's input hidden states, ``out_proj`` its ``(d, H_q · D)`` output projection)."""
    assert ctx.hidden is not None
    q, k, v = ctx.queries[0].float(), ctx.keys[0].float(), ctx.values[0].float()  # (Hq, T, D), (H, T, D)
    Hq, _T, D = q.shape
    H = k.shape[0]
    G = Hq // H
    h_norm = ctx.hidden[0].float().norm(dim=-1)  # (T,)
    s0, e0 = original
    s1, e1 = repeated
    kk = k.repeat_interleave(G, dim=0)  # (Hq, T, D)
    best = torch.zeros(Hq, e0 - s0)
    for s in range(s1, e1, chunk):
        rows = torch.arange(s, min(e1, s + chunk))
        logits = torch.einsum("hqd,hkd->hqk", q[:, rows], kk[:, : int(rows[-1]) + 1]) * ctx.scaling
        causal = torch.arange(int(rows[-1]) + 1)[None, :] <= rows[:, None]
        probs = logits.masked_fill(~causal[None], float("-inf")).softmax(-1)  # softmax over the whole prompt
        probs = probs[..., s0:e0] / h_norm[rows][None, :, None]
        best = torch.maximum(best, probs.amax(1))
    wo = out_proj.float().T.reshape(Hq, D, -1)  # (Hq, D, d): head h's rows of W_o^T
    vv = v[:, s0:e0].repeat_interleave(G, dim=0)  # (Hq, n, D)
    wov = torch.einsum("hnd,hde->hne", vv, wo).norm(dim=-1)  # (Hq, n) ‖W_o^h v_j‖
    return (best * wov).view(H, G, -1).amax(1).clamp_min(1e-30).log()


__all__ = ["INSTRUCTION", "kvzip_plus", "repeat_prompt"]
