"""Microbenchmark of ragged decode kernels: one decode step of attention over every layer of a head-adaptive cache.

Candidates, all over the same rows (one (sequence, KV head) pair each, every row its own length), measured
interleaved in one run (each repetition runs every candidate once, in a rotated order), medians and spread reported,
ratios against the per-row Python loop of the same run:

- ``loop``: the earlier ragged store, kept to compare against — one buffer per row, one SDPA call per row (B x H
  calls per layer);
- ``padded``: one packed buffer with row offsets; each step gathers the rows padded to the longest, masks the slots
  past each row's length and runs one SDPA;
- ``paged-gather``: a shared page pool with a block table (vLLM's layout); each step gathers each row's pages, padded
  to the row with the most pages, and runs one SDPA;
- ``paged[P]``: the same pool read in place by split-K attention (``attention.ragged.paged_decode``), pages of P;
- ``nested``: jagged nested tensors viewing the packed buffer (``torch.nested.nested_tensor_from_jagged``), one SDPA;
- ``flex``: FlexAttention (compiled for CPU) over the padded rows with a length mask, if it compiles here;
- ``uniform``: the dense SDPA a uniform method (SnapKV) runs over the same number of stored entries (the target).

Row lengths: a head-adaptive method's real per-layer, per-head lengths (``--lengths-file``, written by
``--record``) or a synthetic skewed draw. Run: ``python -m tokensieve.bench.ragged_kernel --help``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention.ragged import paged_decode
from ..cache.ragged import RaggedKV, Row

HQ, HKV, D = 9, 3, 64  # SmolLM2-135M's attention geometry


def record_lengths(spec: str, length: int, path: str) -> None:
    """Prefill the embedded model on a ``length``-token prompt with ``spec`` and save its ``(layers, B, H)``
    stored lengths to ``path``."""
    from ..adapters.models import load_model
    from ..engine import compress
    from .runner import bench_prompts

    model, tok = load_model("smollm2-135m")
    ctx = compress(model, spec).prefill(bench_prompts(tok, length, 1))
    torch.save({"spec": spec, "length": length, "lengths": ctx.cache.lengths().clone()}, path)


def synthetic_lengths(layers: int, length: int, ratio: float, seed: int) -> Tensor:
    """``(layers, 1, H_kv)`` skewed lengths (log-normal shares) averaging ``ratio * length``, within
    ``[8, length]``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(1.2 * torch.randn(layers, 1, HKV, generator=g))
    n = (w / w.mean() * ratio * length).round().clamp(8, length)
    return n.long()


class _Layer:
    """One layer's rows in every candidate's layout."""

    def __init__(self, lengths: list[int], batch: int, pages: tuple[int, ...], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        R = batch * HKV
        self.lengths = torch.tensor(lengths * batch, dtype=torch.long)
        self.rows = [Row.of(torch.randn(n, D, generator=g), torch.randn(n, D, generator=g), torch.arange(n), None, 8)
                     for n in self.lengths.tolist()]  # fmt: skip
        self.batch = batch
        # packed buffer with offsets (+ 8 slots of headroom per row, as the rows above)
        self.packed_k = torch.cat([r.k for r in self.rows])
        self.packed_v = torch.cat([r.v for r in self.rows])
        caps = torch.tensor([r.k.shape[0] for r in self.rows])
        self.offsets = torch.cumsum(caps, 0) - caps
        n_max = int(self.lengths.max())
        j = torch.arange(n_max)
        self.filled = j[None, :] < self.lengths[:, None]  # (R, n_max)
        self.slots = torch.where(self.filled, self.offsets[:, None] + j[None, :], torch.zeros(1, dtype=torch.long))
        self.pad_bias = torch.zeros(R, n_max).masked_fill(~self.filled, float("-inf")).view(batch, HKV, 1, n_max)
        # nested: the packed rows without headroom (jagged needs contiguous rows or explicit lengths)
        self.jag_k = torch.cat([r.k[: r.n] for r in self.rows])
        self.jag_v = torch.cat([r.v[: r.n] for r in self.rows])
        self.jag_off = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(self.lengths, 0)])
        self.stores = {P: RaggedKV(self.rows, batch, HKV, page=P) for P in pages}
        # block-table gather: each row's pages padded to the row with the most pages (pad: page 0, masked)
        P0 = pages[len(pages) // 2]
        st = self.stores[P0]
        table, _ = st._table()
        self.bt_page = P0
        self.bt_table = table.clamp_min(0)
        w = table.shape[1]
        fill = (torch.arange(w * P0)[None, :] < self.lengths[:, None]) & (table >= 0).repeat_interleave(P0, 1)
        self.bt_bias = torch.zeros(R, w * P0).masked_fill(~fill, float("-inf")).view(batch, HKV, 1, w * P0)
        # the uniform (SnapKV) target: the same stored entries, every row of the mean length
        m = max(1, round(float(self.lengths.float().mean())))
        self.uni_k = torch.randn(batch, HKV, m, D, generator=g)
        self.uni_v = torch.randn(batch, HKV, m, D, generator=g)


def _loop(layer: _Layer, q: Tensor, scale: float) -> Tensor:
    """The per-row loop of the earlier ragged store (one SDPA per (sequence, KV head))."""
    B = layer.batch
    G = HQ // HKV
    out = q.new_empty(B, HQ, 1, D)
    for b in range(B):
        for h in range(HKV):
            r = layer.rows[b * HKV + h]
            qg = q[b, h * G : (h + 1) * G].reshape(1, 1, G, D)
            o = F.scaled_dot_product_attention(qg, r.k[: r.n][None, None], r.v[: r.n][None, None], scale=scale)
            out[b, h * G : (h + 1) * G] = o.view(G, 1, D)
    return out


def _padded(layer: _Layer, q: Tensor, scale: float) -> Tensor:
    B, n_max = layer.batch, layer.slots.shape[1]
    flat = layer.slots.flatten()
    K = layer.packed_k.index_select(0, flat).view(B, HKV, n_max, D)
    V = layer.packed_v.index_select(0, flat).view(B, HKV, n_max, D)
    out = F.scaled_dot_product_attention(q.view(B, HKV, HQ // HKV, D), K, V, attn_mask=layer.pad_bias, scale=scale)
    return out.view(B, HQ, 1, D)


def _paged_gather(layer: _Layer, q: Tensor, scale: float) -> Tensor:
    B = layer.batch
    st, P = layer.stores[layer.bt_page], layer.bt_page
    flat = layer.bt_table.flatten()
    w = layer.bt_table.shape[1]
    K = st._k.index_select(0, flat).view(B, HKV, w * P, D)
    V = st._v.index_select(0, flat).view(B, HKV, w * P, D)
    out = F.scaled_dot_product_attention(q.view(B, HKV, HQ // HKV, D), K, V, attn_mask=layer.bt_bias, scale=scale)
    return out.view(B, HQ, 1, D)


def _paged(P: int) -> Callable[[_Layer, Tensor, float], Tensor]:
    def run(layer: _Layer, q: Tensor, scale: float) -> Tensor:
        st = layer.stores[P]
        u = st._used
        B = layer.batch
        out = paged_decode(q.view(B * HKV, HQ // HKV, D), st._k[:u], st._v[:u], st._page_row[:u], st._bias[:u],
                           B * HKV, scale)  # fmt: skip
        return out.view(B, HQ, 1, D)

    return run


def _nested(layer: _Layer, q: Tensor, scale: float) -> Tensor:
    B, R, G = layer.batch, layer.batch * HKV, HQ // HKV
    nt = torch.nested.nested_tensor_from_jagged
    k = nt(layer.jag_k[:, None, :], layer.jag_off).transpose(1, 2)  # (R, 1, j, D)
    v = nt(layer.jag_v[:, None, :], layer.jag_off).transpose(1, 2)
    qo = torch.arange(R + 1) * G
    qq = nt(q.reshape(R * G, 1, D), qo).transpose(1, 2)  # (R, 1, G, D)
    o = F.scaled_dot_product_attention(qq, k, v, scale=scale)
    return o.transpose(1, 2).values().view(B, HQ, 1, D)


def _uniform(layer: _Layer, q: Tensor, scale: float) -> Tensor:
    B = layer.batch
    out = F.scaled_dot_product_attention(q.view(B, HKV, HQ // HKV, D), layer.uni_k, layer.uni_v, scale=scale)
    return out.view(B, HQ, 1, D)


def _flex() -> Callable[[_Layer, Tensor, float], Tensor] | None:
    """FlexAttention compiled for CPU over the padded rows, or None if it does not compile here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
    except Exception:  # pragma: no cover - depends on the install
        return None
    masks: dict[int, Any] = {}

    def run(layer: _Layer, q: Tensor, scale: float) -> Tensor:
        B, n_max = layer.batch, layer.slots.shape[1]
        lengths = layer.lengths.view(B, HKV)
        key = id(layer)
        if key not in masks:

            def within(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return kv_idx < lengths[b, h]

            masks[key] = create_block_mask(within, B, HKV, HQ // HKV, n_max, device="cpu")
        flat = layer.slots.flatten()
        K = layer.packed_k.index_select(0, flat).view(B, HKV, n_max, D)
        V = layer.packed_v.index_select(0, flat).view(B, HKV, n_max, D)
        out = compiled(q.view(B, HKV, HQ // HKV, D), K, V, block_mask=masks[key], scale=scale)
        assert isinstance(out, Tensor)
        return out.view(B, HQ, 1, D)

    return run


def _append_loop(layer: _Layer, k: Tensor, v: Tensor) -> None:
    pos = torch.zeros(1, dtype=torch.long)
    for i, r in enumerate(layer.rows):
        r.append(k[i : i + 1], v[i : i + 1], pos)
        r.n -= 1  # keep the rows' lengths fixed across repetitions


def run(
    lengths: Tensor,
    batch: int,
    reps: int,
    pages: tuple[int, ...],
    flex: bool,
    seed: int = 0,
    skip: tuple[str, ...] = (),
) -> dict[str, list[float]]:
    """Per-step times (ms, all layers) of every candidate, ``reps`` interleaved repetitions."""
    torch.manual_seed(seed)
    layers = [_Layer(lengths[i, 0].tolist(), batch, pages, seed + i) for i in range(lengths.shape[0])]
    scale = D**-0.5
    cands: dict[str, Callable[[_Layer, Tensor, float], Tensor]] = {
        "loop": _loop, "padded": _padded, "paged-gather": _paged_gather, "nested": _nested, "uniform": _uniform,
    }  # fmt: skip
    for P in pages:
        cands[f"paged[{P}]"] = _paged(P)
    if flex and (f := _flex()) is not None:
        cands["flex"] = f
    for name in skip:
        cands.pop(name, None)
    qs = [torch.randn(batch, HQ, 1, D) for _ in layers]
    ref = [_loop(layer, q, scale) for layer, q in zip(layers, qs)]
    for name, fn in list(cands.items()):  # correctness on the same rows, and one warm-up
        try:
            for layer, q, r in zip(layers, qs, ref):
                if name != "uniform":
                    torch.testing.assert_close(fn(layer, q, scale), r, atol=1e-4, rtol=1e-4)
        except Exception as e:  # a candidate that does not run here is reported, not measured
            print(f"{name}: not measured ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            del cands[name]
    times: dict[str, list[float]] = {name: [] for name in cands}
    kv = torch.randn(batch * HKV, 1, D)
    times["append:loop"], times[f"append:paged[{pages[0]}]"] = [], []
    names = list(cands)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            fn = cands[name]
            t0 = time.perf_counter()
            for layer, q in zip(layers, qs):
                fn(layer, q, scale)
            times[name].append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        for layer in layers:
            _append_loop(layer, kv[:, 0], kv[:, 0])
        times["append:loop"].append((time.perf_counter() - t0) * 1e3)
        marks = [layer.stores[pages[0]].lengths_list for layer in layers]
        t0 = time.perf_counter()
        for layer in layers:
            layer.stores[pages[0]].append(kv.view(batch, HKV, 1, D), kv.view(batch, HKV, 1, D),
                                          torch.zeros(batch, 1, dtype=torch.long), None)  # fmt: skip
        elapsed = time.perf_counter() - t0
        for layer, mark in zip(layers, marks):  # back to the measured lengths (not timed)
            layer.stores[pages[0]].truncate(mark)
        times[f"append:paged[{pages[0]}]"].append(elapsed * 1e3)
    return times


def table(times: dict[str, list[float]]) -> str:
    base = statistics.median(times["loop"])
    lines = ["| candidate | median ms/step | IQR ms | × loop (same run) |", "|---|---|---|---|"]
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        med = statistics.median(ts)
        ratio = "" if name.startswith("append") else f"{base / med:.2f}"
        lines.append(f"| {name} | {med:.2f} | {q[0]:.2f}–{q[2]:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths-file", help="a file written by --record (default: synthetic skewed lengths)")
    ap.add_argument("--record", nargs=3, metavar=("SPEC", "LENGTH", "PATH"), help="record a method's lengths")
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--ratio", type=float, default=0.125)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--pages", default="16,32,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flex", action="store_true", help="also try FlexAttention compiled for CPU")
    ap.add_argument("--skip", default="", help="candidates not to measure, comma-separated (e.g. nested)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.record:
        record_lengths(a.record[0], int(a.record[1]), a.record[2])
        return
    if a.lengths_file:
        rec = torch.load(a.lengths_file)
        lengths, what = rec["lengths"], f"{rec['spec']} at {rec['length']} tokens"
    else:
        lengths, what = synthetic_lengths(30, a.length, a.ratio, 0), f"synthetic, {a.ratio} of {a.length} tokens"
    pages = tuple(int(p) for p in a.pages.split(","))
    for bs in (int(b) for b in a.batch_sizes.split(",")):
        rows = f"rows: mean {lengths.float().mean():.0f}, min {int(lengths.min())}, max {int(lengths.max())} entries"
        print(
            f"\n{what}, batch {bs}, {lengths.shape[0]} layers, {a.threads} thread(s), {a.reps} interleaved reps; {rows}"
        )
        print(table(run(lengths[:, :1], bs, a.reps, pages, a.flex, skip=tuple(a.skip.split(",")))))


if __name__ == "__main__":
    main()
