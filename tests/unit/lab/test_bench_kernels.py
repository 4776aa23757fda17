"""`tokensieve bench --kernels` on small shapes: every path measured, bytes read as each path reads them, rows in the
store, the medians as JSON, and the refusals. (Timings are not checked: they live in benchmarks.)"""

from __future__ import annotations

import json

import pytest
import torch

from tokensieve import ConfigError
from tokensieve.attention import flex
from tokensieve.bench.kernels import HKV, KernelConfig, adakv_lengths, parse_length, run_kernels, sparse_blocks
from tokensieve.cli import main
from tokensieve.results.kernels import kernel_summary
from tokensieve.results.store import ResultStore, is_kernel


@pytest.fixture
def eager_flex():
    previous = flex.set_compile(False)  # the same token mask computed densely: no compilation in unit tests
    yield
    flex.set_compile(previous)


def test_lengths_and_config_are_checked():
    assert parse_length("8k") == 8192
    assert parse_length("32K") == 32768
    assert parse_length("100") == 100
    with pytest.raises(ConfigError, match="8k"):
        parse_length("eight")
    with pytest.raises(ConfigError, match="float32 and/or bfloat16"):
        KernelConfig(dtypes=("float16",))
    with pytest.raises(ConfigError, match="Unknown kernel path"):
        KernelConfig(paths=("dense", "quest"))
    assert KernelConfig(dtypes=("fp32", "bf16")).dtypes == ("float32", "bfloat16")


def test_adakv_allocation_is_uneven_and_exact():
    g = torch.Generator().manual_seed(0)
    idx, counts = adakv_lengths(2, 512, 0.125, g)
    assert counts.shape == (2, HKV)
    assert counts.sum(-1).tolist() == [round(0.125 * HKV * 512)] * 2  # the total budget, exactly
    assert int(counts.max()) > int(counts.min())  # per-head lengths differ
    for b in range(2):
        for h in range(HKV):
            row = idx[b, h]
            kept = row[row >= 0]
            assert kept.numel() == int(counts[b, h])
            assert bool((kept[1:] > kept[:-1]).all())


def test_sparse_prefill_blocks_keep_one_eighth_with_sink_and_diagonal():
    blocks = sparse_blocks(64, 0.125, torch.Generator().manual_seed(1))
    i = torch.arange(64)
    assert bool(blocks[0, :, i, i].all())
    assert bool(blocks[0, :, :, 0].all())
    assert not bool((blocks[0] & ~(i[None, :] <= i[:, None])).any())  # causal
    density = blocks.sum().item() / (blocks.shape[1] * 64 * 65 / 2)
    assert 0.11 < density < 0.16


def test_every_path_measured_with_its_bytes(tmp_path, eager_flex):
    cfg = KernelConfig(lengths=(256,), batch_sizes=(1, 2), dtypes=("float32", "bfloat16"), repetitions=2,
                       prefill_lengths=(1024,), prefill_repetitions=1, block=64)  # fmt: skip
    with ResultStore(tmp_path / "k.sqlite") as store:
        rows, info = run_kernels(cfg, store=store)
        stored = store.rows("bench")
    assert len(stored) == len(rows)
    assert all(is_kernel(r) for r in stored)
    assert len({r["key"] for r in stored}) == len(stored)
    summary = {(e["method"], e["batch"], e["dtype"]): e for e in kernel_summary(stored)}
    backends = info["backends"]
    for dtype, es in (("float32", 4), ("bfloat16", 2)):
        for batch in (1, 2):
            dense = summary[("dense", batch, dtype)]
            assert dense["bytes_read"] == 2 * batch * HKV * 256 * 128 * es
            assert summary[("snapkv", batch, dtype)]["bytes_read"] == dense["bytes_read"] / 8
            assert summary[("stream", batch, dtype)]["fraction_of_bound"] == pytest.approx(1.0)
            if "cpp" in backends:  # the fused kernel over the same contiguous caches, against SDPA's time
                for path in ("dense", "snapkv"):
                    sdpa, cpp = summary[(path, batch, dtype)], summary[(f"{path}[cpp]", batch, dtype)]
                    assert cpp["bytes_read"] == sdpa["bytes_read"]
                    assert cpp["fraction_of_bound"] > 0
                    assert cpp["time_vs_snapkv"] == pytest.approx(cpp["ms"] / summary[("snapkv", batch, dtype)]["ms"])
                assert dense["speedup_vs_dense"] == 1.0
            for b in backends:
                ragged = summary[(f"ragged[{b}]", batch, dtype)]
                assert ragged["kv_bytes"] == dense["bytes_read"] / 8  # 1/8 of the tokens in total, exactly
                assert ragged["bytes_read"] >= ragged["kv_bytes"]  # whole pages and their slot bias are read
                head, kv = summary[(f"quest-head[{b}]", batch, dtype)], summary[(f"quest-kv[{b}]", batch, dtype)]
                assert kv["bytes_read"] < head["bytes_read"] <= head["selected_bytes"]  # the union, read once
                assert head["union_bytes"] == head["bytes_read"]
                for e in (ragged, head, kv):
                    assert e["fraction_of_bound"] > 0
                    assert e["stream_ms"] > 0
        pre = summary[("prefill-sparse", 1, dtype)]
        assert pre["phase"] == "prefill"
        assert 0.1 < pre["density"] < 0.3
        assert pre["speedup_vs_dense"] > 0


def test_cli_writes_json_and_refuses_kernel_flags_elsewhere(tmp_path, eager_flex, capsys):
    out = tmp_path / "k.json"
    assert main(["bench", "--kernels", "--lengths", "128", "--batch-sizes", "1", "--dtypes", "float32", "--reps", "1",
                 "--prefill-lengths", "none", "--paths", "dense,quest-kv,stream", "--json", str(out),
                 "--threads", "1"]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert data["command"].startswith("tokensieve bench --kernels --lengths 128 --batch-sizes 1 --dtypes float32")
    methods = {r["method"] for r in data["rows"]}
    assert "dense" in methods
    assert "stream" in methods
    assert any(m.startswith("quest-kv[") for m in methods)
    for r in data["rows"]:
        assert {"method", "length", "batch", "dtype", "ms", "bytes_read", "fraction_of_bound"} <= set(r)
    assert "quest-kv" in capsys.readouterr().out
    assert main(["bench", "--dtypes", "float32"]) == 2
    assert "--dtypes belongs to --kernels" in capsys.readouterr().err
    assert main(["bench", "--kernels", "--json", str(tmp_path), "--lengths", "128", "--prefill-lengths", "none"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_whole_prefill_against_amdahls_bound():
    """The speed summary's prefill speed-up over Amdahl's bound, for sparse prefill methods only."""
    from tokensieve.results.stats import amdahl, speed

    base = {"prefill_s": 10.0, "prefill_attn_s": 6.0}
    got = amdahl(base, {"prefill_s": 5.0})
    assert got["amdahl_bound"] == pytest.approx(2.5)
    assert got["prefill_speedup"] == pytest.approx(2.0)
    assert got["of_amdahl"] == pytest.approx(0.8)
    common = {"length": 8192, "batch": 1, "rep": 0, "budget": "100%", "decode": None, "decode_budget": None,
              "chunk": None, "compress_s": 0.0, "decode_s": 1.0, "steps": 2, "tok_s": 2.0, "attn_ms": 1.0,
              "bytes_read": 1.0, "kv_bytes": 1, "alloc_bytes": 1, "meta_bytes": 0, "stored_entries": 1,
              "prefill_peak_rss": 1, "decode_peak_rss": 1, "compile_s": 0.0}  # fmt: skip
    rows = [
        {**common, "label": "full", "method": "full", "prefill": "full", "prefill_s": 10.0, "ttft_s": 10.0,
         "prefill_attn_s": 6.0},
        {**common, "label": "ashape", "method": "ashape", "prefill": "ashape", "prefill_s": 5.0, "ttft_s": 5.0,
         "prefill_attn_s": 1.0},
        {**common, "label": "snapkv:0.25", "method": "snapkv", "prefill": "snapkv:0.25", "prefill_s": 11.0,
         "ttft_s": 11.0, "prefill_attn_s": 6.0},
    ]  # fmt: skip
    by = {m["label"]: m for m in speed(rows, {"bandwidth": 1e10, "weights_bytes": 0})}
    assert by["ashape"]["of_amdahl"] == pytest.approx(0.8)
    assert by["snapkv:0.25"]["of_amdahl"] != by["snapkv:0.25"]["of_amdahl"]  # NaN: not a sparse prefill


@pytest.mark.parametrize("group", ["per_head", "max"])
def test_quest_rounding_ties_are_left_out_of_the_agreement_check(monkeypatch, group):
    """Two backends may order a page bound's sum differently, so pages whose bounds tie can swap at the top-k
    boundary: those query heads are left out of the check, any other difference in the choice is an error."""
    from tokensieve.attention import fused
    from tokensieve.bench import kernels

    g = torch.Generator().manual_seed(0)
    n, P = 256, 16
    keys = torch.randn(1, HKV, n, 128, generator=g)
    keys[:, :, 3 * P : 4 * P] = keys[:, :, 7 * P : 8 * P]  # pages 3 and 7: equal keys, so equal bounds
    store = kernels.DenseKV(keys, torch.randn(1, HKV, n, 128, generator=g), torch.arange(n).expand(1, HKV, n))
    q = torch.randn(1, kernels.HQ, 1, 128, generator=g)
    method, layer = kernels._quest(store, group, P, 0.125, n, 1)
    cur = method._step_plan(store, layer.run)[0]
    meta = layer.state["meta"]
    qg = q.view(1, HKV, -1, 128)
    exact = torch.matmul(torch.cat([qg.relu(), qg], -1).double(), meta[..., :cur].double())
    if group == "max":
        exact = exact.amax(2, keepdim=True)
    k = method._step_plan(store, layer.run)[1]
    real = fused.page_bounds

    def rounded(nudge):
        """The bounds as a backend that rounds differently would give them: pages 3 and 7 race for the last chosen
        place (k − 2 other pages clearly ahead), 7 ahead by ``nudge`` in "cpp" and behind in "torch"."""

        def bounds(qg_, meta_, cur_):
            out = real(qg_, meta_, cur_).clone()
            top = out.max()
            out[..., 8 : 8 + k - 2] = top + 10.0
            out[..., 3] = top + 1.0
            out[..., 7] = top + 1.0 + (nudge if fused.backend() == "cpp" else -nudge)
            return out

        return bounds

    backend = {"name": "torch"}
    monkeypatch.setattr(fused, "backend", lambda: backend["name"])

    def with_backend(name, fn):
        def call():
            backend["name"] = name
            return fn()

        return call

    monkeypatch.setattr(kernels, "_with_backend", with_backend)
    monkeypatch.setattr(fused, "page_bounds", rounded(1e-7 * float(exact.abs().max())))
    # the real bounds of pages 3 and 7 are equal, so the swap is a tie: every query head is marked
    tied = kernels._quest_ties(method, layer, q, ("torch", "cpp"))
    assert bool(tied.all())
    keys2 = keys.clone()
    keys2[:, :, 7 * P] += 5.0  # page 7 now differs: its bound is no longer equal to page 3's
    store2 = kernels.DenseKV(keys2, store.values, store.positions)
    method2, layer2 = kernels._quest(store2, group, P, 0.125, n, 1)
    with pytest.raises(RuntimeError, match="beyond a rounding tie"):
        kernels._quest_ties(method2, layer2, q, ("torch", "cpp"))
