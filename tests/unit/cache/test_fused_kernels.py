"""The fused gather-and-attend decode kernel and the decode paths that use it (Quest in both GQA forms, the ragged
store), each against an eager attention written here from the definitions, with the C++ kernel and with the PyTorch
fallback."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from tokensieve.attention import fused
from tokensieve.cache.decode import DecodeLayer, DecodeRun
from tokensieve.cache.ragged import RaggedKV
from tokensieve.cache.storage import DenseKV
from tokensieve.core.context import ModelShape
from tokensieve.errors import ConfigError
from tokensieve.methods.kv.quest import Quest


def _cpp_or_skip() -> None:
    previous = fused.set_backend("auto")
    try:
        if fused.kernels() is None:
            pytest.skip("the C++ kernels cannot be built here")
    finally:
        fused.set_backend(previous)


@pytest.fixture(params=["cpp", "torch"])
def backend(request):
    if request.param == "cpp":
        _cpp_or_skip()
    previous = fused.set_backend(request.param)
    yield request.param
    fused.set_backend(previous)


def _softmax_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                    bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One query ``(D,)`` over ``keys``/``values`` ``(n, D)``, in float64: the definition of attention."""
    if keys.shape[0] == 0:
        return torch.zeros(q.shape[-1], dtype=torch.float64)
    logits = [float(q.double() @ keys[j].double()) * scale for j in range(keys.shape[0])]
    if bias is not None:
        logits = [x + float(b) for x, b in zip(logits, bias)]
    top = max(logits)
    if top == -math.inf:
        return torch.zeros(q.shape[-1], dtype=torch.float64)
    w = torch.tensor([math.exp(x - top) for x in logits], dtype=torch.float64)
    return (w / w.sum()) @ values.double()


# -- the kernel itself -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("threads", [1, 3])  # several threads: rows split into chunks of pages, then combined
@pytest.mark.parametrize("G", [3, 4, 6])  # query heads per KV head: blocks of four, a partial last block
def test_kernel_matches_definition(shared, dtype, with_bias, threads, G):
    _cpp_or_skip()
    previous = fused.set_backend("cpp")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(7)
        R, D, P, N, W = 5, 16, 8, 60, 40  # 40 pages per list: several chunks per row
        scale = D**-0.5
        q = torch.randn(R, G, D, generator=g).to(dtype)
        kp = torch.randn(N, P, D, generator=g).to(dtype)
        vp = torch.randn(N, P, D, generator=g).to(dtype)
        pages = torch.randint(0, N, (R, 1 if shared else G, W), generator=g)
        pages[1] = -1  # a row with nothing to read
        pages[2, :, -2:] = -1  # padded lists
        bias = None
        if with_bias:
            bias = torch.randn(N, P, generator=g).to(dtype)
            bias[torch.rand(N, P, generator=g) < 0.3] = float("-inf")  # empty slots
            bias[3] = float("-inf")  # a whole page of empty slots
        out, counts = fused.paged_attention(q, kp, vp, pages, scale, bias=bias)
        assert out.dtype == dtype
        assert out.shape == (R, G, D)
        for r in range(R):
            union = pages[r][pages[r] >= 0].unique()
            assert int(counts[r]) == (union.numel() if not shared else int((pages[r] >= 0).sum()))
            for h in range(G):
                mine = pages[r, 0 if shared else h]
                mine = mine[mine >= 0].unique() if not shared else mine[mine >= 0]
                keys = kp[mine].reshape(-1, D)
                values = vp[mine].reshape(-1, D)
                b = None if bias is None else bias[mine].reshape(-1)
                want = _softmax_attend(q[r, h].float(), keys.float(), values.float(), scale, b)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(out[r, h].double(), want, atol=tol, rtol=tol)
    finally:
        fused.set_backend(previous)
        torch.set_num_threads(before)


def test_kernel_dense_layout_limit():
    """A row-major dense layout: slots at or past ``limit`` of every row are not attended to."""
    _cpp_or_skip()
    previous = fused.set_backend("cpp")
    try:
        g = torch.Generator().manual_seed(3)
        rows, per_row, P, D, G, n = 3, 5, 4, 8, 2, 18  # 18 of 20 slots filled: the last page is partial
        kp = torch.randn(rows * per_row, P, D, generator=g)
        vp = torch.randn(rows * per_row, P, D, generator=g)
        q = torch.randn(rows, G, D, generator=g)
        pages = (torch.tensor([0, 2, 4]) + torch.arange(rows)[:, None] * per_row)[:, None, :]  # (R, 1, 3)
        out, _ = fused.paged_attention(q, kp, vp, pages, 0.5, per_row=per_row, limit=n)
        for r in range(rows):
            slots = [p * P + j for p in (0, 2, 4) for j in range(P) if p * P + j < n]
            flat_k = kp[r * per_row : (r + 1) * per_row].reshape(-1, D)[slots]
            flat_v = vp[r * per_row : (r + 1) * per_row].reshape(-1, D)[slots]
            for h in range(G):
                torch.testing.assert_close(out[r, h].double(), _softmax_attend(q[r, h], flat_k, flat_v, 0.5),
                                           atol=1e-5, rtol=1e-5)  # fmt: skip
    finally:
        fused.set_backend(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [3, 4])
def test_kernel_at_head_dim_128_with_partial_pages_and_nan_in_empty_slots(dtype, G):
    """The vectorised paths of a real head size (four key rows at a time, then the rows left of a partial page); an
    empty slot (bias -inf) is never read into the result, even when its key and value are NaN."""
    _cpp_or_skip()
    previous = fused.set_backend("cpp")
    try:
        g = torch.Generator().manual_seed(11)
        rows, per_row, P, D, n = 2, 4, 16, 128, 45  # 45 of 64 slots: the last page holds 13 (three blocks of 4 + 1)
        kp = torch.randn(rows * per_row, P, D, generator=g).to(dtype)
        vp = torch.randn(rows * per_row, P, D, generator=g).to(dtype)
        q = torch.randn(rows, G, D, generator=g).to(dtype)
        bias = torch.zeros(rows * per_row, P).to(dtype)
        empty = torch.rand(rows * per_row, P, generator=g) < 0.2
        bias[empty] = float("-inf")
        kp[empty] = float("nan")
        vp[empty] = float("nan")
        pages = (torch.arange(per_row) + torch.arange(rows)[:, None] * per_row)[:, None, :]
        out, _ = fused.paged_attention(q, kp, vp, pages, D**-0.5, bias=bias, per_row=per_row, limit=n)
        for r in range(rows):
            slots = [j for j in range(per_row * P) if j < n and not empty[r * per_row + j // P, j % P]]
            keys = kp[r * per_row : (r + 1) * per_row].reshape(-1, D)[slots].float()
            values = vp[r * per_row : (r + 1) * per_row].reshape(-1, D)[slots].float()
            for h in range(G):
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(out[r, h].double(), _softmax_attend(q[r, h].float(), keys, values, D**-0.5),
                                           atol=tol, rtol=tol)  # fmt: skip
    finally:
        fused.set_backend(previous)


@pytest.mark.parametrize("n", [1, 37, 48])  # one slot, a partial last page, whole pages
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contiguous_attention_matches_definition(n, dtype):
    """The kernel over contiguous buffers (every page of each row, the first ``n`` slots) is attention over them."""
    _cpp_or_skip()
    previous = fused.set_backend("cpp")
    try:
        g = torch.Generator().manual_seed(n)
        B, H, G, D, cap = 2, 2, 3, 16, 64
        keys = torch.randn(B, H, cap, D, generator=g).to(dtype)
        values = torch.randn(B, H, cap, D, generator=g).to(dtype)
        q = torch.randn(B, H * G, 1, D, generator=g).to(dtype)
        out = fused.contiguous_attention(q, keys, values, n, 0.25)
        assert out.shape == (B, H * G, 1, D)
        assert out.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for b in range(B):
            for h in range(H * G):
                want = _softmax_attend(q[b, h, 0].float(), keys[b, h // G, :n].float(), values[b, h // G, :n].float(),
                                       0.25)  # fmt: skip
                torch.testing.assert_close(out[b, h, 0].double(), want, atol=tol, rtol=tol)
        with pytest.raises(ValueError, match="multiple of 16"):
            fused.contiguous_attention(q, keys[:, :, :40].contiguous(), values[:, :, :40].contiguous(), 30, 0.25)
    finally:
        fused.set_backend(previous)


def test_page_bounds_match_definition(backend):
    g = torch.Generator().manual_seed(2)
    B, H, G, D, pages, cur = 2, 3, 4, 16, 300, 290
    qg = torch.randn(B, H, G, D, generator=g)
    meta = torch.randn(B, H, 2 * D, pages, generator=g)
    got = fused.page_bounds(qg, meta, cur)
    want = (qg.double().clamp(min=0) @ meta[:, :, :D, :cur].double()) + qg.double() @ meta[:, :, D:, :cur].double()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_owner_table_lists_each_rows_pages_in_pool_order(backend):
    page_row = torch.tensor([2, 0, -1, 2, 1, 0, 2, -1])
    table = fused.owner_table(page_row, 4)
    assert table.shape == (4, 1, 3)
    assert table[:, 0].tolist() == [[1, 5, -1], [4, -1, -1], [0, 3, 6], [-1, -1, -1]]


# -- Quest -------------------------------------------------------------------------------------------------------
def _quest_reference(keys, values, q, n, P, k, per_head, scale):
    """Quest from its definition: page bounds ``Σ_d max(q_d M_d, q_d m_d)`` over the complete pages, the top
    ``k - 1`` of them (per query head, or by the group's maximum bound) plus the current page, exact attention."""
    B, H, _, D = keys.shape
    G = q.shape[1] // H
    cur = (n - 1) // P
    out = torch.zeros(B, H * G, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            pages = keys[b, h, : cur * P].view(cur, P, D)
            hi, lo = pages.amax(1), pages.amin(1)  # (cur, D)
            qs = q[b, h * G : (h + 1) * G, 0]  # (G, D)
            bounds = torch.maximum(qs[:, None, :] * hi[None], qs[:, None, :] * lo[None]).sum(-1)  # (G, cur)
            group = bounds.max(0).values
            for i in range(G):
                score = bounds[i] if per_head else group
                chosen = [*sorted(score.topk(k - 1).indices.tolist()), cur]
                slots = [p * P + j for p in chosen for j in range(P) if p * P + j < n]
                out[b, h * G + i] = _softmax_attend(qs[i], keys[b, h, slots], values[b, h, slots], scale)
    return out


@pytest.mark.parametrize("group", ["per_head", "max"])
@pytest.mark.parametrize("n", [96, 101])  # full current page, partial current page
@pytest.mark.parametrize("B", [1, 2])
def test_quest_step_matches_definition(backend, group, n, B):
    g = torch.Generator().manual_seed(n + B)
    H, G, P, D = 2, 4, 8, 16
    method = Quest(page=P, min_pages=2, dense_layers=0, group=group)
    keys = torch.randn(B, H, n, D, generator=g)
    values = torch.randn(B, H, n, D, generator=g)
    store = DenseKV(keys, values, torch.arange(n).expand(B, H, n), reserve=5)
    run = DecodeRun(ModelShape(1, H * G, H, D, 1024), torch.tensor([0]), ts.Budget.ratio(0.25))
    layer = DecodeLayer(0, store, run, D**-0.5)
    layer.state = method.setup(layer, None)
    method.on_append(layer, 1)
    q = torch.randn(B, H * G, 1, D, generator=g)
    out = method.step(layer, q)
    k = max(method.min_pages, -(-run.tokens_for(n) // P))
    want = _quest_reference(keys, values, q, n, P, k, group == "per_head", D**-0.5)
    torch.testing.assert_close(out[:, :, 0].double(), want, atol=1e-5, rtol=1e-5)
    # bytes read: the distinct pages of each KV head (the union of its query heads' pages) + the page metadata
    assert run.bytes_read > 0


def test_quest_bytes_read_are_the_same_on_both_backends():
    _cpp_or_skip()
    reads = {}
    for name in ("cpp", "torch"):
        previous = fused.set_backend(name)
        try:
            g = torch.Generator().manual_seed(11)
            B, H, G, P, D, n = 2, 2, 4, 8, 16, 160
            method = Quest(page=P, min_pages=2, dense_layers=0)
            store = DenseKV(torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g),
                            torch.arange(n).expand(B, H, n))  # fmt: skip
            run = DecodeRun(ModelShape(1, H * G, H, D, 1024), torch.tensor([0]), ts.Budget.ratio(0.25))
            layer = DecodeLayer(0, store, run, D**-0.5)
            layer.state = method.setup(layer, None)
            method.on_append(layer, 1)
            method.step(layer, torch.randn(B, H * G, 1, D, generator=g))
            reads[name] = run.bytes_read
        finally:
            fused.set_backend(previous)
    assert reads["cpp"] == reads["torch"]


# -- the ragged store --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_ragged_decode_matches_definition(backend, dtype, with_bias):
    g = torch.Generator().manual_seed(5)
    B, H, G, D, P = 2, 3, 4, 16, 8
    lengths = torch.tensor([0, 5, 40, 17, 8, 63])  # an empty row, partial pages, whole pages
    total = int(lengths.sum())
    k = torch.randn(total, D, generator=g).to(dtype)
    v = torch.randn(total, D, generator=g).to(dtype)
    bias = torch.randn(total, generator=g).to(dtype) if with_bias else None
    store = RaggedKV.packed(k, v, torch.arange(total), bias, lengths, B, H, reserve=3, page=P)
    # one decode step's token appended to every row (the pool's pages of different rows interleave)
    kn = torch.randn(B, H, 1, D, generator=g).to(dtype)
    vn = torch.randn(B, H, 1, D, generator=g).to(dtype)
    store.append(kn, vn, torch.full((B, 1), 999), None)
    q = torch.randn(B, H * G, 1, D, generator=g).to(dtype)
    out = store.attend(q, D**-0.5)
    assert out.dtype == dtype
    starts = torch.cumsum(lengths, 0) - lengths
    for b in range(B):
        for h in range(H):
            r = b * H + h
            s, e = int(starts[r]), int(starts[r] + lengths[r])
            keys = torch.cat([k[s:e], kn[b, h]]).float()
            values = torch.cat([v[s:e], vn[b, h]]).float()
            bb = None if bias is None else torch.cat([bias[s:e].float(), torch.zeros(1)])
            for i in range(G):
                want = _softmax_attend(q[b, h * G + i, 0].float(), keys, values, D**-0.5, bb)
                tol = 1e-5 if dtype == torch.float32 else 3e-2
                torch.testing.assert_close(out[b, h * G + i, 0].double(), want, atol=tol, rtol=tol)


# -- choosing the implementation ---------------------------------------------------------------------------------
def test_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="auto, torch, cpp"):
        fused.set_backend("fast")


def test_missing_compiler_message(monkeypatch, capsys):
    """No compiler: ``auto`` says so in one line and falls back; ``cpp`` refuses with the reason."""
    monkeypatch.setattr(fused, "_MODULE", None)
    monkeypatch.setattr(fused, "_FAILED", None)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    previous = fused.set_backend("auto")
    try:
        assert fused.kernels() is None
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert "no C++ compiler found" in err[0]
        assert "PyTorch kernels" in err[0]
        assert fused.backend() == "torch"
        assert capsys.readouterr().err == ""  # said once
        fused.set_backend("cpp")
        with pytest.raises(ConfigError, match="no C\\+\\+ compiler found"):
            fused.kernels()
    finally:
        fused.set_backend(previous)
