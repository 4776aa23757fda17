"""The DAAM lab (tokensieve.train.daam): metrics, a tiny training run on a synthetic corpus, frame selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokensieve.data.speech import Corpus
from tokensieve.errors import ConfigError
from tokensieve.train import daam
from tokensieve.train.daam import DaamRun, f1_macro, majority_vote, prepare, select_frames, summary_table


def test_f1_macro() -> None:
    y = np.array([0, 0, 1, 1])
    assert f1_macro(y, y, 2) == 1.0
    assert f1_macro(y, np.array([0, 0, 0, 0]), 2) == pytest.approx((2 / 3 + 0) / 2)
    assert f1_macro(y, np.array([1, 1, 0, 0]), 2) == 0.0


def test_majority_vote_per_recording() -> None:
    group = np.array([0, 0, 0, 1, 1, 2, 2])
    y = np.array([1, 1, 1, 0, 0, 1, 1])
    pred = np.array([1, 0, 1, 0, 1, 1, 0])
    prob = np.array([0.9, 0.2, 0.8, 0.1, 0.7, 0.6, 0.3])
    labels, votes = majority_vote(group, y, pred, prob)
    assert labels.tolist() == [1, 0, 1]
    # recording 0: 2 of 3 → 1; recordings 1 and 2 are ties, decided by the mean probability (0.4 and 0.45 → 0)
    assert votes.tolist() == [1, 0, 0]


def _tiny_corpus(task: str, seed: int = 0) -> Corpus:
    """12 mels × 12 frames; the class shifts the lower bands up (learnable), 3 speakers per split."""
    rng = np.random.default_rng(seed)
    xs, ys, groups, splits, speakers = [], [], [], [], []
    n_classes = 2 if task == "a" else 3
    g = 0
    for spk in range(9):
        split = spk // 3
        for rec in range(4):
            label = (spk + rec) % n_classes
            for _ in range(3 if task == "a" else 1):
                x = rng.normal(size=(12, 12)).astype(np.float32)
                x[: 4 * (label + 1)] += 1.5
                xs.append(x)
                ys.append(label)
                groups.append(g)
                splits.append(split)
                speakers.append(spk)
            g += 1
    classes = ("unmarked", "marked") if task == "a" else ("w0", "w1", "w2")
    return Corpus(np.stack(xs), np.array(ys), np.array(groups), np.array(splits), np.array(speakers), classes,
                  tuple(f"s{i}" for i in range(9)))  # fmt: skip


def test_majority_vote_ties_use_the_mean_probability() -> None:
    labels, votes = majority_vote(np.array([0, 0]), np.array([1, 1]), np.array([1, 0]), np.array([0.9, 0.3]))
    assert votes.tolist() == [1]
    assert labels.tolist() == [1]


@pytest.mark.parametrize(("task", "network"), [("a", "cnnlstm"), ("b", "transformer")])
def test_tiny_run_learns_and_saves(tmp_path, task: str, network: str) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    data = prepare(_tiny_corpus(task))
    run = DaamRun(task=task, network=network, attention="daam", time_axis=network == "transformer", epochs=4, batch=8)
    rec = daam.train_run(run, data, out=tmp_path, progress=False)
    assert (tmp_path / "checkpoints" / f"{run.name()}.safetensors").exists()
    assert 1 <= rec["best_epoch"] <= 4
    assert 0.0 <= rec["test"]["f1"] <= 1.0
    assert rec["val"]["f1"] > 0.6  # the shift is easy to see: validation speakers are recognised
    # the same seed gives the same run
    again = daam.train_run(run, data, progress=False)
    assert again["val"] == rec["val"]


def test_grid_skips_finished_runs_and_summarises(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []

    def fake_train(run: DaamRun, data: object, *, out: object = None, progress: bool = True) -> dict:
        calls.append(run.name())
        test = {"f1": 0.5 + 0.1 * run.seed, "acc": 0.6}
        return {"run": run.name(), "config": daam.asdict(run), "parameters": 10, "front_parameters": 2,
                "best_epoch": 1, "val": {"f1": 0.5}, "test": test, "seconds": 0}  # fmt: skip

    monkeypatch.setattr(daam, "train_run", fake_train)
    monkeypatch.setattr(daam, "load_or_build", lambda task, cfg=None, progress=False: _tiny_corpus(task))
    runs = daam.grid("a", ["cnnlstm"], ["daam", "none"], [0, 1], epochs=2)
    daam.run_grid(runs, tmp_path, progress=False)
    assert len(calls) == 4
    records = daam.run_grid(runs, tmp_path, progress=False)
    assert len(calls) == 4  # all done: nothing retrained
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    table = summary_table(records)
    assert "| A | cnnlstm | daam | 10 (2) | 2 | 0.550 ± 0.071 |" in table
    first = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert first["run"] == runs[0].name()
    assert first["corpus"] == daam.CorpusConfig().key("a")
    with pytest.raises(ConfigError, match="another speech corpus"):  # results of another corpus are not reused
        daam.run_grid(runs, tmp_path, daam.CorpusConfig(seed=5), progress=False)


def test_frame_selection_keeps_the_most_important_frames() -> None:
    torch.manual_seed(0)
    model = daam.build_model(DaamRun(network="transformer", time_axis=True), mels=8, frames=12, outputs=1).eval()
    x = torch.randn(3, 8, 12)
    keep = select_frames(model, x, 0.25, "importance")
    assert keep.shape == (3, 3)
    assert torch.all(keep[:, 1:] > keep[:, :-1])  # sorted, distinct
    imp = daam.frame_importance(model, x)
    for b in range(3):
        assert set(keep[b].tolist()) == set(imp[b].topk(3).indices.tolist())
    assert select_frames(model, x, 0.5, "uniform").shape == (3, 6)
    assert (
        select_frames(model, x, 0.5, "random", seed=1).tolist()
        == select_frames(model, x, 0.5, "random", seed=1).tolist()
    )
    no_time = daam.build_model(DaamRun(network="transformer"), mels=8, frames=12, outputs=1)
    with pytest.raises(ConfigError, match="time-axis"):
        daam.frame_importance(no_time, x)


def test_bad_runs_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        DaamRun(network="rnn").check()
    with pytest.raises(ConfigError):
        DaamRun(attention="mha", time_axis=True).check()
    with pytest.raises(ConfigError):
        daam.parse_seeds("a-b")
    assert daam.parse_seeds("0-4") == [0, 1, 2, 3, 4]


def test_report_command_prints_the_table_of_every_run(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from tokensieve.cli import main

    for seed, f1 in ((0, 0.6), (1, 0.8)):
        run = DaamRun(task="b", network="cnnlstm", attention="none", seed=seed, epochs=3)
        rec = {"run": run.name(), "config": daam.asdict(run), "parameters": 7, "front_parameters": 0, "best_epoch": 2,
               "val": {"f1": 0.5}, "test": {"f1": f1, "acc": f1}, "seconds": 1}  # fmt: skip
        with open(tmp_path / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    (tmp_path / "frames_b.json").write_text(json.dumps([
        {"run": "r", "fraction": 0.5, "how": "uniform", "f1": 0.4, "acc": 0.5, "ms": 10.0},
    ]))  # fmt: skip
    assert main(["train", "daam-report", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| B | cnnlstm | none | 7 (0) | 2 | 0.700 ± 0.141 |" in out
    assert "| daam+time | 50% | uniform | 1 | 0.400 ± 0.000 |" in out
    assert main(["train", "daam-report", "--out", str(tmp_path / "empty")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_one_time_head_normalises_over_all_frames() -> None:
    run = DaamRun(task="b", network="transformer", attention="daam", time_axis=True, time_heads=1, feedforward=64)
    assert run.name().startswith("b-transformer-daam+time-th1-")
    model = daam.build_model(run, 40, 120, 12)
    _, ws = model.front(torch.randn(2, 40, 120), return_weights=True)
    torch.testing.assert_close(ws[1].sum(2), torch.ones(2, 40))  # one head: each band's weights over all frames
    default = daam.build_model(DaamRun(task="b", network="transformer", attention="daam", time_axis=True,
                                       feedforward=64), 40, 120, 12)  # fmt: skip
    _, wd = default.front(torch.randn(2, 40, 120), return_weights=True)
    torch.testing.assert_close(wd[1][:, :, :30].sum(2), torch.ones(2, 40))  # 4 heads: per 30-frame chunk
    with pytest.raises(ConfigError, match="needs --time-axis"):
        DaamRun(time_heads=1).check()


def test_frames_and_figures_keep_the_time_head_settings_apart(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(daam, "load_or_build", lambda task, cfg=None, progress=False: _tiny_corpus(task))
    runs = [DaamRun(task="b", network="transformer", attention="daam", time_axis=True, time_heads=th, epochs=1,
                    batch=8, feedforward=32) for th in (0, 1)]  # fmt: skip
    daam.run_grid(runs, tmp_path, progress=False)
    rows = daam.frame_selection(tmp_path, [0.5], progress=False)
    assert {r["front"] for r in rows} == {"daam+time", "daam+time (1 time head)"}
    table = daam.frames_table(rows)
    assert "| daam+time (1 time head) | 50% | importance | 1 |" in table
    summary = summary_table(list(daam.done_runs(tmp_path).values()))
    assert "| B | transformer | daam+time | " in summary
    assert "| B | transformer | daam+time (1 time head) | " in summary
    paths = daam.figures(tmp_path, tmp_path / "figs")
    assert tmp_path / "figs" / "daam_task_b_frames.png" in paths
    assert all(p.stat().st_size > 0 for p in paths)


def test_frame_selection_standardises_as_in_training(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # a run trained on thinned segments sees inputs standardised with the thinned training split's statistics;
    # frame selection must score it on the same inputs, not on inputs standardised with every training segment
    corpus = _tiny_corpus("a")
    first = np.array([i == 0 or corpus.group[i] != corpus.group[i - 1] for i in range(len(corpus.y))])
    corpus.x[first & (corpus.split == 0)] += 3.0  # the rows thinning keeps: other statistics than all rows
    monkeypatch.setattr(daam, "load_or_build", lambda task, cfg=None, progress=False: corpus)
    run = DaamRun(task="a", network="transformer", attention="daam", time_axis=True, epochs=1, batch=8,
                  feedforward=32, segments=1)  # fmt: skip
    daam.run_grid([run], tmp_path, progress=False)
    seen: list[np.ndarray] = []
    real_score = daam.score

    def spy(model: torch.nn.Module, part: Corpus, n_classes: int, **kw: object) -> dict[str, float]:
        seen.append(part.x.copy())
        return real_score(model, part, n_classes, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(daam, "score", spy)
    daam.frame_selection(tmp_path, [0.5], task="a", progress=False)
    trained_on = prepare(corpus, 1).test.x
    assert seen
    assert np.abs(prepare(corpus, 0).test.x - trained_on).max() > 0.1  # the two standardisations differ here
    for x in seen:
        np.testing.assert_array_equal(x, trained_on)


# ------------------------------------------------------------------------------------- the modules, the selector
def test_official_runs_are_named_apart_and_old_configs_read_as_v1() -> None:
    run = DaamRun(task="b", network="transformer", attention="daam", time_axis=True, feedforward=512, epochs=10)
    assert run.name() == "b-transformer-daam+time-s0-e10-ff512-official"
    old = DaamRun(task="b", network="transformer", attention="daam", time_axis=True, feedforward=512, epochs=10,
                  modules="v1")  # fmt: skip
    assert old.name() == "b-transformer-daam+time-s0-e10-ff512"  # the name runs of the earlier modules had
    config = {k: v for k, v in daam.asdict(old).items() if k not in ("modules", "pool", "selector")}
    assert DaamRun.from_config(config) == old  # a v1 record rebuilds the v1 network
    legacy = daam.build_model(old, 8, 12, 3)
    assert legacy.pool == "mean"
    assert legacy.front.gaussian.layers[0].stable  # type: ignore[union-attr,index]
    official = daam.build_model(run, 8, 12, 3)
    assert official.pool == "last"
    assert not official.front.gaussian.layers[0].stable  # type: ignore[union-attr,index]
    assert daam.front_label(config) == "daam+time [v1]"
    assert daam.front_label(daam.asdict(run)) == "daam+time"
    sel = DaamRun(network="transformer", attention="daam", time_axis=True, selector="density", pool="mean")
    assert sel.name().endswith("-pmean-official-select-density")
    assert daam.front_label(daam.asdict(sel)) == "daam+time, mean pooling + density selector"
    with pytest.raises(ConfigError):
        DaamRun(network="cnnlstm", selector="density").check()
    with pytest.raises(ConfigError):
        DaamRun(network="transformer", selector="topk").check()
    with pytest.raises(ConfigError):
        DaamRun(network="cnnlstm", pool="mean").check()
    with pytest.raises(ConfigError):
        DaamRun(modules="v2").check()


def test_selector_step_trains_the_density(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    run = DaamRun(task="b", network="transformer", attention="daam", time_axis=True, selector="density", feedforward=32)
    model = daam.build_model(run, 8, 12, 3)
    x = torch.randn(4, 8, 12)
    monkeypatch.setattr(daam, "SELECT_TRAIN_FRACTIONS", (0.25,))
    monkeypatch.setattr(daam, "SELECT_P_LEARNED", 1.0)  # the learned draw: the density gets gradients
    model.zero_grad()
    logits = daam.selector_step(model, x, torch.Generator().manual_seed(1))
    assert logits.shape == (4, 3)
    logits.sum().backward()
    grads = [p.grad for p in model.scorer.parameters()]  # type: ignore[union-attr]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    # the forward value is the encoder on the kept frames (dropout-free): the frames at the points offset + i of the
    # running sum of the inclusion probabilities, computed here with a plain loop
    model.eval()
    gen = torch.Generator().manual_seed(3)
    logits = daam.selector_step(model, x, gen)
    gen = torch.Generator().manual_seed(3)
    torch.randint(1, (1,), generator=gen)  # the draws selector_step makes before the phase
    torch.rand((), generator=gen)
    offset = torch.rand(4, generator=gen)
    h = model.front(x)
    with torch.no_grad():
        s = model.scorer(h).double()  # type: ignore[misc]
    d = 0.7 * torch.softmax(s, 1) + 0.3 / 12
    keep = []
    for row in range(4):
        p = _reference_inclusion(d[row].tolist(), 3)
        keep.append(_reference_systematic(p, float(offset[row])))
    torch.testing.assert_close(logits, model.encode(h, torch.tensor(keep)), rtol=1e-4, atol=1e-5)
    # the other half of the draws: evenly spaced frames at a random phase
    monkeypatch.setattr(daam, "SELECT_P_LEARNED", 0.0)
    gen = torch.Generator().manual_seed(5)
    logits = daam.selector_step(model, x, gen)
    gen = torch.Generator().manual_seed(5)
    torch.randint(1, (1,), generator=gen)
    torch.rand((), generator=gen)
    offset = torch.rand(4, generator=gen)
    even = torch.tensor([[int(4 * (i + float(o))) for i in range(3)] for o in offset])
    torch.testing.assert_close(logits, model.encode(h, even), rtol=1e-4, atol=1e-5)


def _reference_inclusion(density: list[float], k: int) -> list[float]:
    """p_t = min(c·d_t, 1) with Σ p = k, c found by bisection (independent of the library's capping rounds)."""
    total = sum(density)
    d = [v / total for v in density]
    lo, hi = 0.0, 1.0
    while sum(min(hi * v, 1.0) for v in d) < k:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(min(mid * v, 1.0) for v in d) < k else (lo, mid)
    return [min(hi * v, 1.0) for v in d]


def _reference_systematic(p: list[float], offset: float) -> list[int]:
    """Systematic sampling as a survey statistician writes it: walk the frames with a running sum, take frame t
    when the next point offset + j is at most the running sum."""
    out, run, j = [], 0.0, 0
    for t, v in enumerate(p):
        run += v
        while j < round(sum(p)) and offset + j < run - 1e-12:
            out.append(t)
            j += 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_inclusion_probabilities_and_systematic_sample_match_the_reference(seed: int) -> None:
    from tokensieve.nn import inclusion_probabilities, systematic_sample

    g = torch.Generator().manual_seed(seed)
    t, k = 40, [1, 5, 10, 20, 33, 40][seed]
    density = torch.softmax(3 * torch.randn(3, t, generator=g, dtype=torch.float64), 1)
    p = inclusion_probabilities(density, k)
    offset = torch.rand(3, generator=g, dtype=torch.float64)
    idx = systematic_sample(p, k, offset)
    for row in range(3):
        ref = _reference_inclusion(density[row].tolist(), k)
        torch.testing.assert_close(p[row], torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-9)
        assert idx[row].tolist() == _reference_systematic(ref, float(offset[row]))
    assert (idx.diff(dim=1) > 0).all()
    assert idx.shape == (3, k)
    # a flat density at phase ½ keeps evenly spaced frames; a frame with p = 1 is always kept
    flat = inclusion_probabilities(torch.ones(1, 12), 3)
    assert systematic_sample(flat, 3, torch.tensor([0.5])).tolist() == [[2, 6, 10]]
    spike = torch.full((1, 12), 0.01)
    spike[0, 7] = 10.0
    sure = inclusion_probabilities(spike, 3)
    assert float(sure[0, 7]) == 1.0
    assert float(sure.sum()) == pytest.approx(3.0)
    for o in (0.0, 0.3, 0.99):
        assert 7 in systematic_sample(sure, 3, torch.tensor([o]))[0].tolist()
    with pytest.raises(ConfigError):
        inclusion_probabilities(torch.ones(1, 4), 5)


def test_choose_frames_learned_and_energy() -> None:
    torch.manual_seed(1)
    run = DaamRun(task="b", network="transformer", attention="daam", time_axis=True, selector="density", feedforward=32)
    model = daam.build_model(run, 8, 12, 3).eval()
    x = torch.randn(2, 8, 12)
    x[:, :, 5] += 4.0  # the loudest frame
    energy = select_frames(model, x, 0.25, "energy")
    assert all(5 in row for row in energy.tolist())
    learned = select_frames(model, x, 0.25, "learned")
    with torch.no_grad():
        d = model.scorer.density(model.front(x)).double()  # type: ignore[union-attr,operator]
    for row in range(2):
        assert learned[row].tolist() == _reference_systematic(_reference_inclusion(d[row].tolist(), 3), 0.5)
    plain = daam.build_model(DaamRun(task="b", network="transformer", feedforward=32), 8, 12, 3)
    with pytest.raises(ConfigError, match="selector"):
        select_frames(plain, x, 0.25, "learned")


def test_paired_statistics() -> None:
    from scipy import stats

    from tokensieve.train.daam_select import paired, t_interval

    m, half = t_interval([0.8, 0.82, 0.79, 0.85, 0.81])
    assert m == pytest.approx(0.814)
    assert half == pytest.approx(2.7764 * np.std([0.8, 0.82, 0.79, 0.85, 0.81], ddof=1) / np.sqrt(5), rel=1e-3)
    a, b = [0.9, 0.8, 0.75, 0.7], [0.8, 0.8, 0.6, 0.65]
    c = paired(a, b)
    assert c["diff"] == pytest.approx(0.075)
    assert (c["wins"], c["losses"], c["n"]) == (3, 0, 4)
    assert c["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert paired([0.5, 0.6], [0.5, 0.6])["p"] == 1.0


def test_daam_select_trains_pairs_and_reports(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from tokensieve.cli import main
    from tokensieve.train import daam_select

    torch.set_num_threads(1)
    fake = lambda task, cfg=None, progress=False: _tiny_corpus(task)  # noqa: E731
    monkeypatch.setattr(daam, "load_or_build", fake)
    monkeypatch.setattr(daam_select, "load_or_build", fake)
    argv = ["train", "daam-select", "--out", str(tmp_path), "--seeds", "0-1", "--epochs", "1", "--feedforward", "32",
            "--repeats", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| selector | 25% | learned | 2 |" in out
    assert "| plain | 100% | all | 2 |" in out
    assert "| 25%: learned − uniform (selector model) |" in out
    assert "within 0.05 F1 of every frame at 25%:" in out
    saved = json.loads((tmp_path / "select_b.json").read_text())
    assert len(saved["rows"]) == 2 * ((1 + 4 * 2) + (1 + 5 * 2))  # seeds × (plain, selector) configurations
    assert all(r["ms"] > 0 for r in saved["rows"])
    assert saved["meta"]["command"].startswith("tokensieve train daam-select")
    names = [json.loads(line)["run"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(names) == 4
    assert sum(n.endswith("-select-density") for n in names) == 2
    assert main(argv) == 0  # resumed: nothing retrained
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    assert main([*argv[:-1], "--keep", "1.0"]) == 2  # a fraction of 1 selects nothing


def test_report_pairs_front_blocks_and_compares_with_the_runs_before_issue_31(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from tokensieve.cli import main

    def write(folder, front: str, f1s: tuple[float, ...], modules: str | None) -> None:  # type: ignore[no-untyped-def]
        folder.mkdir(exist_ok=True)
        for seed, f1 in enumerate(f1s):
            config = daam.asdict(DaamRun(task="b", network="cnnlstm", attention=front, seed=seed, epochs=3))
            if modules is None:  # recorded with the earlier modules
                config = {k: v for k, v in config.items() if k not in ("modules", "pool", "selector")}
            rec = {"run": f"{front}-{seed}-{modules}", "config": config, "parameters": 7, "front_parameters": 0,
                   "best_epoch": 2, "val": {"f1": 0.5}, "test": {"f1": f1, "acc": f1}, "seconds": 1}  # fmt: skip
            with open(folder / "results.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    old, new = tmp_path / "old", tmp_path / "new"
    write(old, "none", (0.6, 0.7, 0.65), None)
    write(new, "none", (0.7, 0.9, 0.8), "official")
    write(new, "mha", (0.8, 0.95, 0.8), "official")
    assert main(["train", "daam-report", "--out", str(new), "--compare", str(old)]) == 0
    out = capsys.readouterr().out
    assert "| B | cnnlstm | mha − none | 3 | 0.050 ± " in out  # paired by seed: +0.1, +0.05, 0
    assert "| 2 / 0 |" in out
    row = next(line for line in out.splitlines() if line.startswith("| B | cnnlstm | none | 3 | 0.650 ± "))
    assert "| 0.800 ± " in row  # the corrected runs' mean next to the v1 runs'
    assert "| 0.150 ± 0.124 | 0.035 | 3 / 0 |" in row  # +0.1, +0.2, +0.15: paired t on 3 seeds
    assert main(["train", "daam-report", "--out", str(new), "--compare", str(tmp_path / "none")]) == 2
