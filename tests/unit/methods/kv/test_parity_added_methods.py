"""Reference parity for the eight methods added from kvpress's family (KeyDiff, LagKV, Expected Attention, CriticalKV,
ChunkKV, SimLayerKV, DuoAttention, KVzip): each keeps exactly the entries its paper's rule picks, computed here with
a straightforward implementation of the formula on small fixed tensors (no library scorer or selector)."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from tokensieve.core.context import LayerContext, LayerWeights, ModelShape, Rope, RunState
from tokensieve.core.method import AuxPass
from tokensieve.core.profiles import DuoGates
from tokensieve.data.prompts import left_pad

D, HQ, HKV, G = 8, 4, 2, 2


def make_run(T=40, budget=12, layers=3, sink=0, recent=0, rope=()):
    shape = ModelShape(layers, HQ, HKV, D, 512, rope=rope)
    return RunState(shape, torch.tensor([budget]), torch.tensor([T]), sink, recent)


def ctx_for(T=40, budget=12, seed=0, layer=1, layers=3, run=None, rope=()):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HQ, T, D, generator=g) * 2
    k = torch.randn(1, HKV, T, D, generator=g) * 2
    v = torch.randn(1, HKV, T, D, generator=g)
    run = run if run is not None else make_run(T, budget, layers, rope=rope)
    return LayerContext(layer, q, k, v, torch.ones(1, T, dtype=torch.bool), D**-0.5, run)


def rows(selection, heads=HKV) -> list[set[int]]:
    return [set(selection.row(0, h).tolist()) for h in range(heads)]


def kept(method, ctx) -> list[set[int]]:
    ctx.run.sink, ctx.run.recent = method.protected()  # as the Compressor resolves them
    return rows(method.compress(ctx).selection)


def top(scores: torch.Tensor, n: int, among: list[int] | None = None) -> set[int]:
    idx = list(range(scores.numel())) if among is None else among
    if n <= 0:
        return set()
    order = sorted(idx, key=lambda j: (-float(scores[j]), j))
    return set(order[:n])


# ---------------------------------------------------------------------------------------------------------- KeyDiff
def keydiff_score(keys: torch.Tensor) -> torch.Tensor:
    """−cos(k_j, mean_i k_i/‖k_i‖) for one head's keys (n, D)."""
    anchor = torch.stack([k / k.norm() for k in keys]).mean(0)
    return torch.tensor([-float(k @ anchor / (k.norm() * anchor.norm())) for k in keys])


def test_keydiff_parity_one_shot_and_block_wise():
    """KeyDiff (arXiv:2504.15364): keep the keys least similar to the anchor; block-wise, the first b tokens fill the
    cache and each block joins it, re-anchored, cut back to b."""
    ctx, budget, block = ctx_for(T=30, budget=9), 9, 7
    keys = ctx.keys[0]
    assert kept(ts.create_method("keydiff", block=0), ctx) == [top(keydiff_score(keys[h]), budget) for h in range(2)]
    expected = []
    for h in range(HKV):
        cache = list(range(budget))
        for start in range(budget, 30, block):
            cand = cache + list(range(start, min(30, start + block)))
            s = keydiff_score(keys[h, cand])
            cache = sorted(cand[i] for i in top(s, budget))
        expected.append(set(cache))
    assert kept(ts.create_method("keydiff", block=block), ctx) == expected


# ------------------------------------------------------------------------------------------------------------ LagKV
def test_lagkv_parity():
    """LagKV (arXiv:2504.04704): partition p is min-max normalised per channel by partition p+1; std over channels,
    softmax over the partition, keys and values averaged; sinks and the tail kept, the rest split evenly over the
    scored partitions (each keeps its best)."""
    sink, lag, P, rem = 2, 4, 4, 3
    T = sink + P * lag + rem  # 21: partitions 0..2 scored, partition 3 + remainder = tail
    budget = 16
    ctx = ctx_for(T=T, budget=budget, seed=5)

    def part_scores(x):  # x (T, D) of one head → {token: score} for scored partitions
        out = {}
        for p in range(P - 1):
            cur = x[sink + p * lag : sink + (p + 1) * lag]
            ref = x[sink + (p + 1) * lag : sink + (p + 2) * lag]
            lo, hi = ref.min(0).values, ref.max(0).values
            spread = torch.tensor([float(((c - lo) / (hi - lo)).std()) for c in cur])
            for i, s in enumerate(torch.softmax(spread, 0)):
                out[sink + p * lag + i] = float(s)
        return out

    tail = set(range(sink + (P - 1) * lag, T))
    expected = []
    for h in range(HKV):
        ks, vs = part_scores(ctx.keys[0, h]), part_scores(ctx.values[0, h])
        free = budget - sink - len(tail)
        share, extra = divmod(free, P - 1)
        keep = set(range(sink)) | tail
        for p in range(P - 1):
            toks = list(range(sink + p * lag, sink + (p + 1) * lag))
            s = torch.zeros(T)
            for j in toks:
                s[j] = (ks[j] + vs[j]) / 2
            keep |= top(s, share + (1 if p < extra else 0), toks)
        expected.append(keep)
    assert kept(ts.create_method("lagkv", sink=sink, lag=lag), ctx) == expected


# ------------------------------------------------------------------------------------------------ Expected Attention
def rotation(t: float, inv_freq: list[float]) -> torch.Tensor:
    """R_t for the rotate-half layout: x ↦ x cos(tθ) + rotate_half(x) sin(tθ), θ repeated for both halves."""
    h = len(inv_freq)
    R = torch.zeros(2 * h, 2 * h, dtype=torch.float64)
    for i, f in enumerate(inv_freq):
        c, s = math.cos(t * f), math.sin(t * f)
        R[i, i], R[i, i + h] = c, -s  # out_i = x_i cos − x_{i+h} sin
        R[i + h, i + h], R[i + h, i] = c, s  # out_{i+h} = x_{i+h} cos + x_i sin
    return R


def test_expected_attention_parity():
    """Expected Attention (arXiv:2510.00636): per query head, mean μ and covariance Σ of the pre-RoPE queries (sinks
    left out), R̄ = mean rotation over the next n_future positions; z_j = R̄μ·k_j/√D + k_jᵀR̄ΣR̄ᵀk_j/(2D), softmax over
    the keys after the sinks, mean over the group, times ‖v_j‖; the sinks kept."""
    inv_freq, T, budget, sink, n_future = [1.0, 0.4, 0.05, 0.01], 30, 10, 2, 16
    ctx = ctx_for(T=T, budget=budget, seed=7, rope=(Rope(tuple(inv_freq)),) * 3)
    g = torch.Generator().manual_seed(11)
    pre = torch.randn(HQ, T, D, generator=g, dtype=torch.float64)
    ctx.queries = torch.stack([torch.stack([rotation(t, inv_freq) @ pre[h, t] for t in range(T)]) for h in range(HQ)])[
        None
    ].float()
    Rbar = torch.stack([rotation(t, inv_freq) for t in range(T, T + n_future)]).mean(0)
    keys, vals = ctx.keys[0].double(), ctx.values[0].double()
    expected = []
    for kv in range(HKV):
        probs = []
        for h in range(kv * G, (kv + 1) * G):
            qs = pre[h, sink:]
            mu = qs.mean(0)
            cov = (qs - mu).T @ (qs - mu) / qs.shape[0]
            m, S = Rbar @ mu, Rbar @ cov @ Rbar.T
            z = torch.tensor([float(m @ keys[kv, j] / math.sqrt(D) + keys[kv, j] @ S @ keys[kv, j] / (2 * D)) for j in
                              range(sink, T)])  # fmt: skip
            probs.append(torch.softmax(z, 0))
        s = torch.zeros(T, dtype=torch.float64)
        s[sink:] = torch.stack(probs).mean(0) * vals[kv, sink:].norm(dim=-1)
        expected.append(set(range(sink)) | top(s, budget - sink, list(range(sink, T))))
    method = ts.create_method("expected_attention", n_future=n_future, sink=sink)
    assert kept(method, ctx) == expected


# -------------------------------------------------------------------------------------------------------- CriticalKV
def projected_norm(values: torch.Tensor, w_o: torch.Tensor, kv: int) -> torch.Tensor:
    """mean over the group of ‖W_o^{(h)} v_j‖₁ (W_o^{(h)}: query head h's columns of the (hidden, H_q·D) matrix)."""
    out = []
    for h in range(kv * G, (kv + 1) * G):
        Wh = w_o[:, h * D : (h + 1) * D]
        out.append(torch.stack([(Wh @ v).abs().sum() for v in values[kv]]))
    return torch.stack(out).mean(0)


def critical_rows(base_scores, values, w_o, budgets, window, T, first_stage=0.5, eps=1e-4):
    expected = []
    win = set(range(T - window, T))
    rest = [j for j in range(T) if j not in win]
    for kv, b in enumerate(budgets):
        n1 = max(math.floor(b * first_stage), window)
        stage1 = win | top(base_scores[kv], n1 - window, rest)
        corrected = (base_scores[kv] + eps) * projected_norm(values, w_o, kv)
        expected.append(stage1 | top(corrected, b - len(stage1), [j for j in range(T) if j not in stage1]))
    return expected


def test_criticalkv_parity():
    """CriticalKV (arXiv:2502.03805): stage 1 keeps the best ⌊b/2⌋ by the base score (SnapKV's window first), stage 2
    fills the budget by (s_j + ε)·mean_group ‖v_j W_o^{(h)}‖₁."""
    T, budget, W = 40, 12, 4
    ctx = ctx_for(T=T, budget=budget, seed=2)
    w_o = torch.randn(24, HQ * D, generator=torch.Generator().manual_seed(3))
    ctx.run.weights = LayerWeights((w_o,) * 3)
    base = ts.create_method("snapkv", window=W)
    s = base.score(ctx)[0]  # SnapKV's scores (its own parity test checks them)
    expected = critical_rows(s, ctx.values[0], w_o, [budget] * HKV, W, T)
    assert kept(ts.create_method("criticalkv", base=base), ctx) == expected


def test_adakv_over_criticalkv_is_critical_adakv():
    """adakv[base=criticalkv] (CriticalAdaKV, arXiv:2502.03805 with arXiv:2407.11550): AdaKV's head budgets from the
    base scores (global top-k across heads, safeguard α = 0.2), then CriticalKV's two stages inside each head's
    budget."""
    T, budget, W, alpha = 60, 16, 8, 0.2
    ctx = ctx_for(T=T, budget=budget, seed=3)
    w_o = torch.randn(24, HQ * D, generator=torch.Generator().manual_seed(4))
    ctx.run.weights = LayerWeights((w_o,) * 3)
    base = ts.create_method("snapkv", window=W)
    s = base.score(ctx)[0]
    free = budget - W
    cand = s[:, : T - W]
    n_h = torch.bincount(cand.reshape(-1).topk(HKV * free).indices // (T - W), minlength=HKV).double()
    cap = n_h * (1 - alpha) + alpha * free
    alloc = torch.floor(cap).long()
    while int(alloc.sum()) < HKV * free:
        alloc[int((cap - alloc).argmax())] += 1
    expected = critical_rows(s, ctx.values[0], w_o, [int(a) + W for a in alloc], W, T)
    method = ts.create_method("adakv", base=ts.create_method("criticalkv", base=base))
    got = kept(method, ctx)
    assert got == expected
    assert sum(len(r) for r in got) == HKV * budget


def test_adakv_over_criticalkv_composes_in_a_spec(tiny_model):
    press = ts.compress(tiny_model, "adakv[base=criticalkv[base=snapkv[window=4]]]:0.3")
    ctx = press.prefill(torch.tensor([list(range(3, 53))]))
    assert ctx.cache.stored_entries() == 3 * HKV * ts.Budget.ratio(0.3).tokens_for(50)


# ----------------------------------------------------------------------------------------------------------- ChunkKV
def test_chunkkv_parity():
    """ChunkKV (arXiv:2502.00299): chunks of c consecutive tokens scored by the mean over the chunk of the base scores
    summed over heads; the best whole chunks kept (one set for every head), the base's window first, the last chunk
    that does not fit cut to its best tokens."""
    T, budget, W, C = 40, 16, 4, 5
    ctx = ctx_for(T=T, budget=budget, seed=4)
    base = ts.create_method("snapkv", window=W)
    s = base.score(ctx)[0].sum(0)  # (T,) summed over KV heads
    chunk_score = {c: float(s[c * C : (c + 1) * C].mean()) for c in range(T // C)}
    window = set(range(T - W, T))
    keep, left = set(window), budget - W
    for c in sorted(chunk_score, key=lambda c: (-chunk_score[c], c)):
        toks = [j for j in range(c * C, (c + 1) * C) if j not in window]
        if len(toks) <= left:
            keep |= set(toks)
            left -= len(toks)
        else:
            keep |= top(s, left, toks)
            left = 0
        if left == 0:
            break
    assert kept(ts.create_method("chunkkv", base=base, chunk=C), ctx) == [keep, keep]


# -------------------------------------------------------------------------------------------------------- SimLayerKV
def test_simlayerkv_parity():
    """SimLayerKV (arXiv:2410.13846): a layer's laziness is the last query's attention (mean over heads) on the first
    sink and last recent tokens; the budget keeps the least lazy layers whole, the others keep sinks + recent."""
    T, budget, sink, recent, L = 40, 20, 2, 6, 3
    run = make_run(T, budget, L)
    method = ts.create_method("simlayerkv", sink=sink, recent=recent)
    run.sink, run.recent = method.protected()
    ctxs = [ctx_for(T=T, seed=10 + layer, layer=layer, run=run) for layer in range(L)]
    scores = [method.score(c) for c in ctxs]
    got = [rows(method.choose(c, s).selection) for c, s in zip(ctxs, scores)]
    mass = []
    for c in ctxs:
        keys = c.keys[0].repeat_interleave(G, 0)  # query head h reads KV head h // G
        logits = torch.stack([keys[h] @ c.queries[0, h, -1] for h in range(HQ)]) / math.sqrt(D)  # (H_q, T)
        a = torch.softmax(logits, -1).mean(0)  # (T,)
        mass.append(float(a[:sink].sum() + a[T - recent :].sum()))
    order = sorted(range(L), key=lambda layer: (mass[layer], layer))  # least lazy first
    window = sink + recent
    counts = dict.fromkeys(range(L), window)
    total = L * budget
    n_full = (total - L * window) // (T - window)
    for layer in order[:n_full]:
        counts[layer] = T
    counts[order[n_full]] += total - sum(counts.values())
    for layer in range(L):
        n = counts[layer]
        expected = set(range(T)) if n == T else set(range(sink)) | set(range(T - (n - sink), T))
        assert got[layer] == [expected, expected], layer


# ------------------------------------------------------------------------------------------------------ DuoAttention
def test_duo_attention_parity():
    """DuoAttention (arXiv:2410.10819): heads ranked by their gate α; the budget keeps the highest-α heads whole
    (retrieval heads), the others keep sink + recent tokens (streaming heads)."""
    T, budget, sink, recent, L = 40, 15, 2, 6, 3
    gates = [[0.9, 0.1], [0.3, 0.95], [0.5, 0.2]]
    run = make_run(T, budget, L)
    run.profile = DuoGates(tuple(tuple(r) for r in gates), sink, recent)
    method = ts.create_method("duo_attention", sink=sink, recent=recent)
    run.sink, run.recent = method.protected()
    got = []
    for layer in range(L):
        c = ctx_for(T=T, seed=20 + layer, layer=layer, run=run)
        got.append(rows(method.compress(c).selection))
    heads = sorted(((layer, h) for layer in range(L) for h in range(HKV)), key=lambda x: -gates[x[0]][x[1]])
    window = sink + recent
    counts = dict.fromkeys(heads, window)
    total = L * HKV * budget
    n_full = (total - len(heads) * window) // (T - window)
    for x in heads[:n_full]:
        counts[x] = T
    counts[heads[n_full]] += total - sum(counts.values())
    for layer in range(L):
        for h in range(HKV):
            n = counts[(layer, h)]
            expected = set(range(T)) if n == T else set(range(sink)) | set(range(T - (n - sink), T))
            assert got[layer][h] == expected, (layer, h)


# ------------------------------------------------------------------------------------------------------------- KVzip
class FakeText:
    def encode(self, text):
        return [90 + len(text) % 5, 91]

    def reply_header(self):
        return [92, 93, 94]


def test_kvzip_repeat_passes_are_the_papers():
    """KVzip (arXiv:2505.23416): chunk 0 is repeated after "Repeat the previous context exactly." and the reply
    header, chunk i after "…, starting with " + the last 8 tokens of chunk i − 1; the sinks are not repeated."""
    from tokensieve.methods.kv.kvzip import FIRST, NEXT

    method = ts.create_method("kvzip", sink=2, chunk=10)
    ids, mask = left_pad([list(range(3, 27)), list(range(30, 42))], 0)
    passes = method.prefill_passes(ids, mask, FakeText())
    text = FakeText()
    assert len(passes) == 3  # 22 tokens after the sinks: chunks of 10, 10, 2
    row0 = list(range(3, 27))
    want = [
        text.encode(FIRST) + text.reply_header() + row0[2:12],
        text.encode(NEXT) + row0[4:12] + text.reply_header() + row0[12:22],
        text.encode(NEXT) + row0[14:22] + text.reply_header() + row0[22:24],
    ]
    for aux, w in zip(passes, want):
        got = aux.input_ids[0][aux.attention_mask[0].bool()].tolist()
        assert got == w
    assert [p.info[0] for p in passes] == [(2, 12), (12, 22), (22, 24)]
    assert [p.info[1] for p in passes] == [(2, 12), None, None]  # the second prompt has one chunk


def test_kvzip_parity():
    """KVzip: s_j = max over the repeat pass's queries and the group of softmax(q Kᵀ/√D)_j, the softmax over the sinks,
    the repeated chunk and the pass's own keys (causal); the L·H·b best scores of the whole model are kept, pooled over
    layers and heads, the sinks first."""
    T, budget, sink, L, N = 24, 7, 2, 3, 9
    method = ts.create_method("kvzip", sink=sink, chunk=T)
    run = make_run(T, budget, L)
    run.sink, run.recent = method.protected()
    ctxs = [ctx_for(T=T, seed=30 + layer, layer=layer, run=run) for layer in range(L)]
    scores = [method.score(c) for c in ctxs]
    aux = AuxPass(torch.zeros(1, N, dtype=torch.long), torch.ones(1, N, dtype=torch.long), ((sink, T),))
    g = torch.Generator().manual_seed(5)
    reference = torch.zeros(L, HKV, T)
    for layer, (c, s) in enumerate(zip(ctxs, scores)):
        q = torch.randn(1, HQ, N, D, generator=g)
        k = torch.randn(1, HKV, N, D, generator=g)
        method.observe_pass(c, s, aux, q, k, torch.ones(1, N, dtype=torch.bool))
        for kv in range(HKV):
            keys = torch.cat([c.keys[0, kv, :sink], c.keys[0, kv, sink:], k[0, kv]])  # sinks, chunk, pass
            for h in range(kv * G, (kv + 1) * G):
                for i in range(N):
                    logits = keys @ q[0, h, i] / math.sqrt(D)
                    logits[T + i + 1 :] = float("-inf")  # causal inside the pass
                    p = torch.softmax(logits, 0)[sink:T]
                    reference[layer, kv, sink:] = torch.maximum(reference[layer, kv, sink:], p)
    reference[:, :, :sink] = float("inf")
    flat = sorted(range(L * HKV * T), key=lambda i: -float(reference.reshape(-1)[i]))[: L * HKV * budget]
    expected = [[set() for _ in range(HKV)] for _ in range(L)]
    for i in flat:
        layer, rest = divmod(i, HKV * T)
        expected[layer][rest // T].add(rest % T)
    got = [rows(method.choose(c, s).selection) for c, s in zip(ctxs, scores)]
    assert got == expected
    assert len({len(r) for layer in got for r in layer}) > 1  # the allocation is uneven across layers and heads


@torch.inference_mode()
def test_kvzip_passes_leave_only_the_compressed_prompt(tiny_model):
    """The reconstruction passes run over the full cache and are forgotten: the prompt's logits are the full cache's,
    the cache has seen the prompt only, and the budget is exact."""
    prompt = torch.tensor([list(range(3, 63))])
    full = ts.compress(tiny_model, "full").prefill(prompt)
    press = ts.compress(tiny_model, "kvzip[chunk=16]", 0.25)
    ctx = press.prefill(prompt)
    torch.testing.assert_close(ctx.logits, full.logits)
    assert ctx.cache.seq_length() == 60
    assert ctx.cache.stored_entries() == 3 * HKV * ts.Budget.ratio(0.25).tokens_for(60)
    assert ctx.compress_seconds > 0
    with ts.compress(tiny_model, "kvzip", 0.5), pytest.raises(ts.CapabilityError, match="repeat"):
        tiny_model.generate(prompt, max_new_tokens=2, do_sample=False)


def test_layer_weights_and_rope_are_read_from_the_model(tiny_model):
    from tokensieve.adapters.models import layer_weights, model_shape

    shape = model_shape(tiny_model)
    rope = shape.rope[0]
    assert rope is not None
    assert len(rope.inv_freq) == D // 2
    w = layer_weights(tiny_model).out_proj
    assert w[0] is not None
    assert torch.equal(w[0], tiny_model.model.layers[0].self_attn.o_proj.weight)


# ------------------------------------------------------------------------------------------- DuoAttention's profiler
@torch.inference_mode(False)
def test_duo_gates_mix_full_and_streaming_attention(tiny_model):
    """DuoAttention's calibration (arXiv:2410.10819): gate 1 is the full model, gate 0 the Λ-shaped streaming model
    (sinks + recent window); training keeps the gates in [0, 1] and restores the model."""
    from tokensieve.profiling.duo_heads import gates_active, streaming_allowed, train_gates

    T, sink, recent = 40, 2, 5
    ids = torch.randint(3, 97, (1, T), generator=torch.Generator().manual_seed(0))
    dec = tiny_model.base_model
    with torch.no_grad():
        full = dec(input_ids=ids, use_cache=False).last_hidden_state
        lam = streaming_allowed(T, sink, recent)[None, None]  # the streaming mask, given to the model as is
        stream = dec(input_ids=ids, attention_mask=lam, use_cache=False).last_hidden_state
        with gates_active(tiny_model, torch.ones(3, HKV), sink, recent):
            gated_full = dec(input_ids=ids, use_cache=False).last_hidden_state
        with gates_active(tiny_model, torch.zeros(3, HKV), sink, recent):
            gated_stream = dec(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(gated_full, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gated_stream, stream, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(stream, full, atol=1e-3)
    implementation = tiny_model.config._attn_implementation
    flags = [p.requires_grad for p in tiny_model.parameters()]
    gates, losses = train_gates(tiny_model, [(ids, 30)], sink=sink, recent=recent, steps=4)
    assert gates.shape == (3, HKV)
    assert bool(((gates >= 0) & (gates <= 1)).all())
    assert len(losses) == 4
    assert tiny_model.config._attn_implementation == implementation
    assert [p.requires_grad for p in tiny_model.parameters()] == flags


@torch.inference_mode()
def test_deferred_selection_inside_generate_equals_the_lean_api(tiny_model):
    """A deferred method (SimLayerKV) selects once the forward pass has scored every layer, in model.generate too."""
    prompt = torch.tensor([list(range(5, 65))])
    press = ts.compress(tiny_model, "simlayerkv[sink=2,recent=8]", 0.4)
    lean = press.decode(press.prefill(prompt), 5).tokens[0]
    with ts.compress(tiny_model, "simlayerkv[sink=2,recent=8]", 0.4):
        out = tiny_model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert out[0, 60:].tolist() == lean


def test_recompress_refuses_scorers_that_need_the_prompt():
    for scorer in ("expected_attention", "simlayerkv", "criticalkv"):
        with pytest.raises(ts.ConfigError, match="only a prefill has"):
            ts.create_method("recompress", scorer=scorer)


def test_cli_profile_duo_writes_a_profile_duo_attention_uses(tmp_path, tiny_model):
    """`tokensieve profile duo` trains the gates on a model directory (tokenizer included) and writes a profile that
    validates against the model and drives duo_attention; that model's tokenizer also writes KVzip's instruction."""
    import json

    from tests.unit.core.test_registry_cli import save_tiny
    from tokensieve.adapters.models import model_shape, model_text
    from tokensieve.adapters.profiles import Profile
    from tokensieve.cli import main

    save_tiny(tmp_path / "m", tiny_model)
    out = tmp_path / "duo.json"
    argv = ["profile", "duo", "--model", str(tmp_path / "m"), "--steps", "2", "--samples", "1"]
    argv += ["--calibration-tokens", "300", "--sink", "4", "--recent", "16", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    model, _ = ts.load_model(str(tmp_path / "m"))
    prof = Profile(**json.loads(out.read_text()))
    gates = prof.content(model_shape(model))
    assert len(gates.gates) == 3
    assert (gates.sink, gates.recent) == (4, 16)
    with torch.inference_mode():
        press = ts.compress(model, "duo_attention[sink=4,recent=16]", 0.5, profile=prof)
        ctx = press.prefill(torch.tensor([list(range(3, 63))]))
    assert ctx.cache.stored_entries() == 3 * HKV * 30
    text = model_text(model)
    assert text.encode("Repeat") is not None
    first = ts.create_method("kvzip").prefill_passes(
        torch.tensor([list(range(3, 30))]), torch.ones(1, 27, dtype=torch.long), text
    )[0]
    assert first.input_ids.shape[1] > 27 - 4  # instruction and reply header before the repeated tokens


@torch.inference_mode()
def test_undoing_the_models_rope_gives_its_pre_rope_keys(tiny_model):
    """Expected Attention undoes the rotation with the frequencies read from the model: layer 0's stored keys,
    un-rotated, are the model's own k_proj outputs."""
    from tokensieve.attention.rope import unrotate
    from tokensieve.profiling.probe import probe_prefill

    T = 30
    ids = torch.randint(3, 97, (1, T), generator=torch.Generator().manual_seed(1))
    seen = {}
    press, _ = probe_prefill(tiny_model, ids, lambda c: seen.setdefault(c.layer_idx, c.keys.clone()))
    rope = press.shape.rope[0]
    assert rope is not None
    layer = tiny_model.model.layers[0]
    x = layer.input_layernorm(tiny_model.model.embed_tokens(ids))
    pre = layer.self_attn.k_proj(x).view(1, T, HKV, D).transpose(1, 2)
    got = unrotate(seen[0], torch.arange(T), torch.tensor(rope.inv_freq), rope.scaling)
    torch.testing.assert_close(got, pre, atol=1e-4, rtol=1e-4)
