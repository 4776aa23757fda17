"""Chunked prefill: a prompt prefilled in chunks, the cache re-compressed to the budget after each.

One chunk = one-shot prefill; 100 % budget = plain transformers; a batch = its rows alone; a layer never holds more
than its budget plus one chunk; every compressing prefill method either runs in chunks or is refused before work.
"""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.core.capabilities import Phase
from tokensieve.core.method import PrefillMethod
from tokensieve.data.prompts import left_pad
from tokensieve.engine import check_chunk, chunk_bounds
from tokensieve.engine.prefill.chunked import Chunked
from tokensieve.errors import CapabilityError, ConfigError
from tokensieve.registry import create_method, get_method_class, method_names
from tokensieve.spec import Spec

COMPRESSING = [
    m
    for m in method_names()
    if get_method_class(m).capabilities.apply.value != "none"
    and Phase.PREFILL in get_method_class(m).capabilities.phases
]
SPARSE = ["ashape", "flexprefill", "minference", "hip"]


def press_for(model, spec, profiles=None, **kw):
    """A Compressor with the tiny model's synthetic profiles for whichever of its methods needs one."""
    parsed = Spec.parse(spec)
    kinds = {m.capabilities.profile for m in (parsed.method, parsed.decode) if m is not None}
    given = [profiles[k] for k in sorted(kinds - {None})] if profiles else []
    return ts.compress(model, spec, profile=given or None, **kw)


def prompts(seed=0, lengths=(70, 43, 58)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def refusal(name: str) -> str | None:
    method = create_method(name)
    return method.chunk_refusal() if isinstance(method, PrefillMethod) else None


def test_chunk_bounds_count_from_the_end():
    assert chunk_bounds(100, 16) == [(0, 4)] + [(s, s + 16) for s in range(4, 100, 16)]
    assert chunk_bounds(32, 16) == [(0, 16), (16, 32)]
    assert chunk_bounds(10, 16) == [(0, 10)]
    for bad in (0, 1, 2.5, True, "8"):
        with pytest.raises(ConfigError, match="chunk must be"):
            check_chunk(bad)


@torch.inference_mode()
def test_one_chunk_is_the_one_shot_prefill(tiny_model):
    ids = torch.tensor([prompts()[0]])
    press = ts.compress(tiny_model, "snapkv[window=8]", 0.25)
    one = press.prefill(ids)
    same = press.prefill(ids, chunk=ids.shape[1])
    assert torch.equal(one.logits, same.logits)
    for a, b in zip(one.cache.stores(), same.cache.stores()):
        assert torch.equal(a.keys, b.keys)
        assert torch.equal(a.positions, b.positions)


@pytest.mark.parametrize("spec", ["snapkv[window=8]", "pyramidkv", "tova", "h2o", "knorm", "full"])
@torch.inference_mode()
def test_full_budget_in_chunks_equals_plain_transformers(spec, tiny_model):
    rows = prompts(seed=2)
    ids, mask = left_pad(rows, 0)
    ref = tiny_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    press = ts.compress(tiny_model, spec, 1.0, chunk=16)
    ctx = press.prefill(ids, mask)
    torch.testing.assert_close(ctx.logits, ref.logits[:, -1].float(), atol=1e-4, rtol=1e-4)
    assert ctx.cache.seq_length() == ids.shape[1]
    assert [int(n) for n in ctx.cache.lengths()[0, :, 0]] == [len(r) for r in rows]  # nothing evicted, no padding


@pytest.mark.parametrize("spec", ["snapkv[window=8]:0.3", "pyramidkv[window=4]:0.3", "streaming_llm:0.3"])
@torch.inference_mode()
def test_batch_in_chunks_equals_each_prompt_alone(spec, tiny_model):
    rows = prompts(seed=1)
    ids, mask = left_pad(rows, 0)
    press = ts.compress(tiny_model, spec, chunk=16)
    ctx = press.prefill(ids, mask)
    first = ctx.logits.clone()
    lengths = ctx.cache.lengths()
    gen = press.decode(ctx, 3)
    for b, r in enumerate(rows):
        single = press.prefill(torch.tensor([r]))
        torch.testing.assert_close(first[b], single.logits[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(lengths[:, b], single.cache.lengths()[:, 0])
        assert gen.tokens[b] == press.decode(single, 3).tokens[0]


@torch.inference_mode()
def test_chunks_differ_from_one_shot_yet_keep_the_same_budget_at_true_positions(tiny_model):
    ids = torch.tensor([prompts(seed=3, lengths=(90,))[0]])
    press = ts.compress(tiny_model, "snapkv[window=8]", 0.2)
    one = press.prefill(ids)
    chunked = press.prefill(ids, chunk=20)
    assert torch.equal(one.cache.lengths(), chunked.cache.lengths())  # 18 entries per row in both
    assert chunked.cache.allocated_bytes() == one.cache.allocated_bytes()  # the last chunk's room is given back
    assert chunked.cache.stats.compressed_tokens == [90]
    assert chunked.cache.stats.budget_tokens == [18]
    for store in chunked.cache.stores():
        pos = store.positions
        assert bool((pos >= 0).all())
        assert bool((pos < 90).all())
        assert bool((pos[..., -8:] == torch.arange(82, 90)).all())  # the last window is kept, at its true positions
    kept_one = {tuple(s.positions.flatten().tolist()) for s in one.cache.stores()}
    kept_chunked = {tuple(s.positions.flatten().tolist()) for s in chunked.cache.stores()}
    assert kept_one != kept_chunked  # earlier chunks were scored by their own queries


@pytest.mark.parametrize(("spec", "chunk"), [("snapkv[window=8]:0.2", 16), ("pyramidkv[window=4]:24", 10)])
@torch.inference_mode()
def test_a_layer_never_holds_more_than_its_budget_plus_one_chunk(spec, chunk, tiny_model, monkeypatch):
    rows = prompts(seed=4, lengths=(100, 77))
    ids, mask = left_pad(rows, 0)
    seen: list[tuple[int, int, int]] = []  # (layer, entries per row before, after) for every re-compression
    original = Chunked.settle

    def spy(self, c, store):
        before = int(store.lengths().max())
        kept = original(self, c, store)
        seen.append((c.layer_idx, before, int(kept.lengths().max()), int(self.run.budget_tokens.max())))
        return kept

    monkeypatch.setattr(Chunked, "settle", spy)
    press = ts.compress(tiny_model, spec, chunk=chunk)
    ctx = press.prefill(ids, mask)
    n_chunks = len(chunk_bounds(ids.shape[1], chunk))
    assert len(seen) == n_chunks * 3  # every layer after every chunk
    final = ctx.cache.lengths().amax(dim=(1, 2))  # (L,) each layer's own count (pyramid: deeper layers keep fewer)
    for layer, before, after, _ in seen:
        assert before <= int(final[layer]) + chunk
        assert after <= int(final[layer])
    one = press.prefill(ids, mask)
    assert torch.equal(ctx.cache.lengths(), one.cache.lengths())  # the same layer budgets as one-shot


@pytest.mark.parametrize("name", COMPRESSING)
def test_every_compressing_method_runs_in_chunks_or_is_refused_before_work(name, tiny_model, tiny_profiles):
    why = refusal(name)
    calls = []

    def no_forward(*args, **kwargs):  # pragma: no cover - must never run for a refused method
        calls.append(1)
        raise AssertionError("forward ran")

    if why is not None:
        with pytest.raises(CapabilityError, match="cannot compress a prompt chunk by chunk") as err:
            press_for(tiny_model, f"{name}:0.5", tiny_profiles, chunk=16)
        assert why in str(err.value)
        press = press_for(tiny_model, f"{name}:0.5", tiny_profiles)
        press._forward = no_forward  # type: ignore[method-assign]
        with pytest.raises(CapabilityError, match="cannot compress a prompt chunk by chunk"):
            press.prefill(torch.tensor([prompts()[0]]), chunk=16)
        assert not calls
        return
    with torch.inference_mode():
        press = press_for(tiny_model, f"{name}:0.25", tiny_profiles, chunk=16)
        rows = prompts(seed=5)
        ids, mask = left_pad(rows, 0)
        ctx = press.prefill(ids, mask)
        one = press_for(tiny_model, f"{name}:0.25", tiny_profiles).prefill(ids, mask)
        assert torch.equal(ctx.cache.lengths(), one.cache.lengths()), name
        assert torch.isfinite(ctx.logits).all()
        assert len(press.decode(ctx, 2).tokens) == len(rows)


def test_refusals_name_their_reason():
    assert "every layer" in (refusal("kvzip") or "")
    assert "every layer" in (refusal("simlayerkv") or "")
    assert "auxiliary tokens" in (refusal("dapq") or "")
    assert "merge" in (refusal("ems") or "")
    assert "different counts" in (refusal("adakv") or "")
    assert "all of its queries" in (refusal("expected_attention") or "")
    for name in SPARSE:
        assert "sparse attention pattern" in (refusal(name) or "")
    for name in ("snapkv", "pyramidkv", "h2o", "tova", "knorm", "streaming_llm", "criticalkv", "full"):
        assert refusal(name) is None, name


@torch.inference_mode()
def test_query_agnostic_reuse_after_a_chunked_prefill(tiny_model):
    g = torch.Generator().manual_seed(6)
    context = torch.randint(3, 97, (1, 80), generator=g)
    questions = [torch.randint(3, 97, (1, 7), generator=g) for _ in range(2)]
    exact = ts.compress(tiny_model, "snapkv[window=8]", 1.0, chunk=16)
    ctx = exact.prefill(context)
    for question in questions:
        fork = ctx.fork()
        exact.extend(fork, question)
        ref = tiny_model(input_ids=torch.cat([context, question], 1)).logits[:, -1].float()
        torch.testing.assert_close(fork.logits, ref, atol=1e-4, rtol=1e-4)
    press = ts.compress(tiny_model, "snapkv[window=8]", 0.25, chunk=16)
    ctx = press.prefill(context)
    mark = ctx.checkpoint()
    press.extend(ctx, questions[0])
    assert int(ctx.cache.lengths().max()) == 20 + 7  # the question is appended whole after the compressed context
    assert len(press.decode(ctx, 3).tokens[0]) <= 3
    ctx.rollback(mark)
    assert int(ctx.cache.lengths().max()) == 20


@torch.inference_mode()
def test_a_decode_method_starts_after_the_chunked_prompt(tiny_model):
    ids = torch.tensor([prompts()[0]])
    press = ts.compress(tiny_model, "snapkv[window=8]:0.5+streaming_llm[sink=2]:20", chunk=16)
    ctx = press.prefill(ids)
    assert int(ctx.cache.lengths().max()) == 35
    press.decode(ctx, 4)
    assert int(ctx.cache.lengths().max()) <= 20 + 1
    with pytest.raises(CapabilityError, match="whole prompt's queries"):
        ts.compress(tiny_model, "snapkv:0.5+h2o:20", chunk=16)


def test_the_pipeline_refuses_before_work_when_chunk_is_given_late(tiny_model):
    press = ts.compress(tiny_model, "adakv", 0.5)
    press._forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("forward ran"))  # type: ignore[method-assign]
    with pytest.raises(CapabilityError, match="different counts"):
        press.prefill(torch.tensor([prompts()[0]]), chunk=16)
    with pytest.raises(ConfigError, match="chunk must be"):
        press.prefill(torch.tensor([prompts()[0]]), chunk=1)


def test_bench_prefills_in_chunks_under_its_own_keys(tiny_model):
    from tokensieve.bench.config import BenchConfig, bench_specs
    from tokensieve.bench.runner import row_key, run_bench
    from tokensieve.data.testing import CharTokenizer

    kw = {"specs": bench_specs("snapkv[window=8]:0.25"), "lengths": (80,), "decode_tokens": 2, "repetitions": 1}
    cfg = BenchConfig(**kw, threads=1, chunk=16)  # type: ignore[arg-type]
    rows, _ = run_bench(cfg, model_and_tokenizer=(tiny_model, CharTokenizer()), bandwidth=1e10)
    snap = next(r for r in rows if r.label.startswith("snapkv"))
    assert snap.stored_entries == 3 * 2 * (20 + 2 + 2)  # budget of the 80 tokens, then warm-up and decode steps
    assert snap.prefill_peak_rss > 0
    spec = cfg.specs[-1]
    plain = BenchConfig(**kw, threads=1)  # type: ignore[arg-type]
    assert row_key(spec, model="m", length=80, batch=1, rep=0, cfg=cfg) != row_key(
        spec, model="m", length=80, batch=1, rep=0, cfg=plain
    )
    with pytest.raises(ConfigError, match="--chunk"):
        BenchConfig(**kw, threads=1, chunk=1)  # type: ignore[arg-type]


@torch.inference_mode()
def test_a_dense_store_allocates_only_the_budget_plus_one_chunk(tiny_model, monkeypatch):
    from tokensieve.cache.dense import DenseKV

    ids = torch.tensor(prompts(seed=7, lengths=(100, 100)))  # equal lengths: dense stores, compacted in place
    capacities: list[tuple[int, int]] = []  # (while the chunk is in, once re-compressed)
    original = Chunked.settle

    def spy(self, c, store):
        during = store.capacity
        kept = original(self, c, store)
        assert type(kept) is DenseKV
        capacities.append((during, kept.capacity))
        return kept

    monkeypatch.setattr(Chunked, "settle", spy)
    ctx = ts.compress(tiny_model, "snapkv[window=8]:0.2", chunk=16).prefill(ids)
    assert max(c for c, _ in capacities) == 20 + 16  # one chunk of room, never the 25 % slack of a growing store
    assert max(c for _, c in capacities) == 20  # the chunk's room given back after every chunk (no reserve asked)
    assert all(s.capacity == 20 for s in ctx.cache.stores())


def test_generate_under_a_chunked_compressor_is_refused(tiny_model):
    press = ts.compress(tiny_model, "snapkv", 0.5, chunk=16)
    with pytest.raises(ConfigError, match="generate"), press:
        pass  # pragma: no cover - never entered
