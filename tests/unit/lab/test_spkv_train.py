"""The pieces of `tokensieve train spkv` that need no model: the oracle, the target, the training text."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.core.context import LayerContext, ModelShape, RunState
from tokensieve.errors import ConfigError
from tokensieve.train.spkv import SPKVTrainConfig, oracle, soft_target, topic_pages


def test_oracle_matches_a_loop_over_queries_and_heads():
    g = torch.Generator().manual_seed(0)
    Hq, H, T, D, w, horizon = 4, 2, 23, 8, 3, 5
    q, k = torch.randn(1, Hq, T, D, generator=g), torch.randn(1, H, T, D, generator=g)
    shape = ModelShape(1, Hq, H, D, 64)
    run = RunState(shape, torch.tensor([T]), torch.tensor([T]))
    ctx = LayerContext(0, q, k, torch.zeros_like(k), torch.ones(1, T, dtype=torch.bool), D**-0.5, run)
    got = oracle(ctx, w, horizon, chunk=7)
    want = torch.zeros(H, T)
    for hq in range(Hq):
        h = hq // (Hq // H)
        for t in range(T):
            probs = ((q[0, hq, t] @ k[0, h, : t + 1].T) * D**-0.5).softmax(-1)
            for j in range(t + 1):
                if w <= t - j < w + horizon:
                    want[h, j] = max(want[h, j], probs[j])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert bool((got[:, T - w :] == 0).all())  # never out of the window within the sequence


def test_soft_target_is_one_half_at_epsilon_and_monotone():
    o = torch.tensor([0.001, 0.02, 0.5])
    y = soft_target(o, 0.02, 1.0)
    assert abs(float(y[1]) - 0.5) < 1e-6
    assert bool((y[1:] > y[:-1]).all())
    assert abs(float(y[2]) - 1 / (1 + math.exp(-math.log(25)))) < 1e-6


def test_training_text_is_the_packaged_reference_and_settings_are_checked():
    pages, origin = topic_pages()
    assert len(pages) > 50
    assert sum(len(v) for v in pages.values()) > 100_000
    assert "pydoc_data/topics.py" in origin
    with pytest.raises(ConfigError, match="length"):
        SPKVTrainConfig(length=100, window=64, horizon=256).check()


@pytest.mark.parametrize("kind", ["spkv", "retention"])
def test_fit_resumes_where_its_checkpoint_stopped(kind, tmp_path, monkeypatch):
    """Both gates share one fit (SPKVTrainer.optimise): a run that dies after its step-3 checkpoint and is started
    again ends with the same weights as 6 steps in one go (the minibatch stream continues)."""
    import torch

    from tokensieve.train.retention import RetentionTrainConfig, RetentionTrainer
    from tokensieve.train.spkv import SPKVTrainConfig, SPKVTrainer

    Cfg, Trainer = (SPKVTrainConfig, SPKVTrainer) if kind == "spkv" else (RetentionTrainConfig, RetentionTrainer)

    def fit(out):
        tr = Trainer(Cfg(out=str(out), steps=6, batch=16, checkpoint_every=3), progress=False)
        g = torch.Generator().manual_seed(0)
        oracle = (3, 64, 2) if kind == "spkv" else (3, 64, 2, len(tr.ages))
        (out / "collect").mkdir(exist_ok=True)
        shard = {"feats": torch.randn(3, 64, 16, generator=g).half(), "oracle": torch.rand(*oracle, generator=g)}
        torch.save(shard, out / "collect" / "0000.pt")
        return torch.cat([p.detach().flatten() for p in tr.fit().parameters()])

    whole = fit(tmp_path / "a")
    step = torch.optim.AdamW.step
    calls = [0]

    def dies_at_four(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dies_at_four)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "b")
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert torch.load(tmp_path / "b" / "checkpoint.pt")["step"] == 3  # the second start resumes from here
    assert torch.equal(fit(tmp_path / "b"), whole)
