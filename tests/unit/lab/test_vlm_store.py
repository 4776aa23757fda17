"""The VLM's visual-token method comparison in the results store: `vlm-eval --store` rows (columns, counts, resume),
`bench --vlm --store` rows whose labels join them, the report's VLM section, and the paired sign test."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from tokensieve.adapters import vlm as V
from tokensieve.report import write_report
from tokensieve.results.sections import vlm_sign_tests
from tokensieve.results.stats import paired, sign_test, visual_kept
from tokensieve.results.store import ResultStore, is_visual, visual_columns, visual_key
from tokensieve.spec import visual_label

from ..eval_grid import run_grid
from .test_vlm import SMALL

SPECS_TEXT = ("pool,vis:random", "0.25")  # with the full model: three configurations
LABELS = ["full", "pool:0.25", "vis:random:0.25"]
N_SCENES = 2


@pytest.fixture(scope="module")
def small(text_dir_path):
    torch.manual_seed(0)
    model, processor = V.build_vlm(SMALL, text_dir=text_dir_path)
    return model.eval(), processor


@pytest.fixture(scope="module")
def text_dir_path():
    from tokensieve.adapters.models import embedded_dir, is_pulled

    if not is_pulled():
        pytest.skip("needs the embedded text model's tokenizer and weights (`tokensieve pull`)")
    return embedded_dir()


def _eval(small, store_path, **kw):
    from tokensieve.train.evaluate import visual_specs
    from tokensieve.train.vlm_store import evaluate_into_store

    model, processor = small
    specs = visual_specs(*SPECS_TEXT)
    with ResultStore(store_path) as store:
        return evaluate_into_store(model, processor, specs, store, model_key="small-vlm", n_scenes=N_SCENES,
                                   progress=False, command="tokensieve train vlm-eval ...", **kw)  # fmt: skip


@pytest.fixture(scope="module")
def filled(small, tmp_path_factory):
    """A store with the evaluation's rows (and the summary of the run that wrote them)."""
    path = tmp_path_factory.mktemp("vlm") / "r.sqlite"
    return path, _eval(small, path)


def _rows(path, table="eval"):
    with ResultStore(path, readonly=True) as s:
        return s.rows(table)


# ----------------------------------------------------------------------------------------------------- labels
def test_visual_labels_are_canonical():
    assert visual_label("full") == visual_label(None) == "full"
    assert visual_label("todre:11%") == visual_label("todre:0.11") == "todre:0.11"
    assert visual_label("vis:random:0.11") == "vis:random:0.11"  # random is also a KV method: vis: stays
    assert visual_label("vis:random[stage=vision,layer=1]:0.5") == visual_label("vis:random[layer=1,stage=vision]:0.5")
    assert visual_label("fastv:0.5/pool:64") == "pool:64/fastv:0.5"  # stage order
    assert visual_label("todre:0.1/todre[stage=llm]:1.0") == "todre:0.1"  # a companion written out
    assert visual_label("todre:0.1/todre[stage=llm,tau=0.2]:1.0") == "todre:0.1/todre[stage=llm,tau=0.2]:1.0"
    assert visual_label("vis:random[seed=3]:0.2", budgets=False) == "vis:random[seed=3]"
    cols = visual_columns("vis:random:0.11")
    assert (cols["label"], cols["method"], cols["budget"], cols["budget_kind"], cols["budget_value"]) == (
        "vis:random:0.11", "vis:random", "11%", "ratio", 0.11)  # fmt: skip
    assert visual_columns("full")["budget"] == "100%"
    assert is_visual({"spec": json.dumps(cols["spec"])})
    assert not is_visual({"spec": json.dumps({"method": {"name": "full"}})})
    assert visual_key("todre:11%", model="m") == visual_key("todre:0.11", model="m") != visual_key("todre:0.11")


# ------------------------------------------------------------------------------------------------ eval rows
def test_eval_rows_have_the_columns_and_counts(filled, small):
    from tokensieve.data.scenes import QUESTION_TYPES, questions, scenes
    from tokensieve.train.evaluate import evaluate_specs, visual_specs

    path, summary = filled
    per_scene = [questions(s) for s in scenes("test", N_SCENES)]
    qs = [q for scene_qs in per_scene for q in scene_qs]
    assert (summary.total, summary.already, summary.ran) == (3 * len(qs), 0, 3 * len(qs))
    rows = _rows(path)
    assert len(rows) == len({r["key"] for r in rows}) == 3 * len(qs)
    assert sorted({r["label"] for r in rows}) == LABELS
    for r in rows:
        assert is_visual(r)
        assert r["method"] == {"full": "full", "pool:0.25": "pool", "vis:random:0.25": "vis:random"}[r["label"]]
        assert r["budget"] == ("100%" if r["label"] == "full" else "25%")
        assert r["task"].split("/")[0] == "scenes"
        assert r["task"].split("/")[1] in QUESTION_TYPES
        assert (r["mode"], r["metric"], r["model"]) == ("aware", "exact_match", "small-vlm")
        assert r["score"] in (0.0, 1.0)
        assert r["seed"] in range(N_SCENES)
        options = json.loads(r["task_options"])
        assert (options["split"], options["scene"]) == ("test", r["seed"])
        (q,) = [q for q in per_scene[r["seed"]] if q.text == options["question"]]
        assert json.loads(r["answers"]) == [q.answer]
        assert r["task"] == f"scenes/{q.type}"
        assert isinstance(r["output"], str)
        extra = json.loads(r["extra"])
        assert extra["image_tokens"] == 256
        assert r["length"] == r["prompt_tokens"] > 256
        assert r["context_tokens"] == (256 if r["label"] == "full" else 64)  # 25 % of 256 to the last layer
        assert visual_kept(r) == (1.0 if r["label"] == "full" else 0.25)
        # KV: every layer holds the prompt's tokens (all of them unpruned); entries = tokens x KV heads x layers
        assert min(r["full_kv_bytes"], r["full_entries"]) > 0
        if r["label"] == "full":
            assert (r["kv_bytes"], r["stored_entries"]) == (r["full_kv_bytes"], r["full_entries"])
        else:
            assert r["stored_entries"] * r["prompt_tokens"] == r["full_entries"] * (r["prompt_tokens"] - 192)
            assert r["kv_bytes"] * r["prompt_tokens"] == r["full_kv_bytes"] * (r["prompt_tokens"] - 192)
        assert r["run_id"] is not None
        assert r["cell_s"] > 0
    # the same answers as evaluate_specs (the table vlm-eval prints without a store)
    model, processor = small
    plain = evaluate_specs(model, processor, visual_specs(*SPECS_TEXT), n_scenes=N_SCENES, progress=False)
    for spec, acc in summary.by_spec.items():
        assert dict(acc.right) == dict(plain[spec].right)
        assert dict(acc.total) == dict(plain[spec].total)
    with ResultStore(path, readonly=True) as s:
        (run,) = s.runs("vlm-eval")
    assert run["todo"] == run["cells"] == len(rows)
    assert json.loads(run["config"])["specs"] == LABELS


def test_a_rerun_skips_stored_keys_and_fills_gaps(filled, small, tmp_path):
    path, first = filled
    copy = tmp_path / "copy.sqlite"
    with sqlite3.connect(path) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    again = _eval(small, copy)
    assert (again.total, again.already, again.ran) == (first.total, first.total, 0)
    with ResultStore(copy, readonly=True) as s:
        assert len(s.runs("vlm-eval")) == 1  # nothing to run: no run recorded
    before = {r["key"]: r for r in _rows(copy)}
    gone = [k for k, r in before.items() if r["label"] == "pool:0.25" and r["seed"] == 1]
    with sqlite3.connect(copy) as conn:  # a run killed before the second scene's pool rows
        conn.executemany("DELETE FROM eval WHERE key = ?", [(k,) for k in gone])
    filled_again = _eval(small, copy)
    assert (filled_again.already, filled_again.ran) == (first.total - len(gone), len(gone))
    after = {r["key"]: r for r in _rows(copy)}
    assert after.keys() == before.keys()
    for k in gone:  # a sub-batch of the scene's questions answers as the whole batch did
        assert (after[k]["score"], after[k]["output"]) == (before[k]["score"], before[k]["output"])


# ----------------------------------------------------------------------------------------------- bench rows
def test_bench_rows_join_the_eval_labels(filled, tmp_path):
    from tokensieve.bench.vlm import run_into_store, summarize, vlm_bench_specs

    from ..vlm_tiny import llava, llava_inputs

    path, _ = filled
    store_path = tmp_path / "both.sqlite"
    with sqlite3.connect(path) as src, sqlite3.connect(store_path) as dst:
        src.backup(dst)
    model, inputs = llava(), llava_inputs([6], [1])
    specs = vlm_bench_specs(["pool", "vis:random"], ["25%"])  # other texts, the same configurations
    with ResultStore(store_path) as store:
        rows, _, added = run_into_store(model, inputs, specs, store, tower="tiny", repetitions=2)
    assert added == len(rows) == 2 * 3
    bench = _rows(store_path, "bench")
    assert {r["label"] for r in bench} == {r["label"] for r in _rows(path)} == set(LABELS)
    for r in bench:
        extra = json.loads(r["extra"])
        assert (r["batch"], r["prefill"], r["model"]) == (1, r["label"], "smollm2-135m+tiny-random")
        assert min(r["ttft_s"], r["prefill_s"], r["kv_bytes"], r["prefill_peak_rss"]) > 0
        assert (r["tok_s"], r["decode_s"]) == (None, None)  # no decoding is measured
        assert extra["image_tokens"] == 16
        assert min(extra["vision_flops"], extra["ttft_cpu_s"]) > 0
        assert extra["kept_tokens"] == (16 if r["label"] == "full" else 4)
        assert r["stored_entries"] > 0
    summary = {s["label"]: s for s in summarize(rows)}
    assert summary["pool:0.25"]["kv_bytes"] < summary["full"]["kv_bytes"]
    with ResultStore(store_path) as store:
        again, _, added = run_into_store(model, inputs, specs, store, tower="tiny", repetitions=2)
    assert (added, len(again)) == (0, 6)
    with ResultStore(store_path, readonly=True) as s:
        assert len(s.runs("bench-vlm")) == 1


# ----------------------------------------------------------------------------------------------------- report
def test_report_renders_the_vlm_section(filled, tmp_path, tiny_model):
    from tokensieve.bench.vlm import run_into_store, vlm_bench_specs
    from tokensieve.train.vlm_store import record_overlays

    from ..vlm_tiny import llava, llava_inputs

    path, _ = filled
    store_path = tmp_path / "all.sqlite"
    with sqlite3.connect(path) as src, sqlite3.connect(store_path) as dst:
        src.backup(dst)
    # KV rows next to the VLM's: their sections stay as they were
    run_grid({"tasks": "passkey", "methods": "snapkv", "budgets": "0.5", "lengths": "400", "depths": "0.5",
              "seeds": "0", "modes": "aware", "text": "generated", "threads": "1"}, tiny_model, store_path)  # fmt: skip
    png = tmp_path / "patches.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    with ResultStore(store_path) as store:
        run_into_store(llava(), llava_inputs([6], [1]), vlm_bench_specs("pool,vis:random", ["0.25"]), store,
                       tower="tiny", repetitions=1)  # fmt: skip
        record_overlays(store, png, specs=LABELS, model_key="small-vlm", n_scenes=1, split="test", command="c",
                        threads=1)  # fmt: skip
    out = tmp_path / "rep"
    write_report(store_path, out, formats=["md", "html"])
    md = (out / "report.md").read_text()
    assert "## Visual-token pruning (VLM)" in md
    assert "### Accuracy of small-vlm on test scenes" in md
    assert "| configuration | budget | visual kept | KV kept | n | all questions | attribute |" in md
    assert "| full | 100% | 100% | 100% |" in md
    assert "| pool:0.25 | 25% | 25% |" in md
    assert "### Against random selection (small-vlm, test)" in md
    assert "| pool:0.25 | vis:random:0.25 |" in md
    assert "### Which patches each method keeps" in md
    assert (out / "vlm_kept_patches.png").is_file()
    assert "### Prefill speed (tokensieve bench --vlm)" in md
    assert "| smollm2-135m+tiny-random | pool:0.25 | 1 | 4 → 4 of 16 |" in md
    images = [line[line.index("(") + 1 : -1] for line in md.splitlines() if line.startswith("![")]
    plot = [i for i in images if i.startswith("vlm_accuracy_")]
    assert len(plot) == 1
    assert (out / plot[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the KV sections see the KV rows only
    assert "| passkey | snapkv:0.5 | 50% |" in md
    assert "scenes/" not in md.split("## Visual-token pruning (VLM)")[0]
    assert "Speed and memory (tokensieve bench)" not in md  # no KV benchmark rows
    data = json.loads((out / "summary.json").read_text())
    assert {a["task"] for a in data["accuracy"]} == {"passkey"}
    overall = {(v["label"], v["questions"]): v for v in data["vlm"] if "questions" in v}
    assert overall[("full", "all")]["n"] == len([r for r in _rows(path) if r["label"] == "full"])
    assert any(v.get("vs") == "vis:random:0.25" for v in data["vlm"])


# -------------------------------------------------------------------------------------------------- sign test
def test_sign_test_exact_values():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_test(6, 1) == pytest.approx(2 * (1 + 7) / 128)
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert sign_test(10, 10) == 1.0
    with pytest.raises(ValueError, match="counts"):
        sign_test(-1, 2)


def _row(label, method, q, score, budget="25%"):
    return {"label": label, "method": method, "budget": budget, "model": "m", "task": "scenes/counting",
            "task_options": json.dumps({"question": q}), "score": score}  # fmt: skip


def test_paired_comparison_on_a_hand_made_case():
    # 8 questions answered by both, one by the method only (left out): both right 2, only method 5, only random 1
    method = [1, 1, 1, 1, 1, 1, 1, 0, 1]
    random = [1, 1, 0, 0, 0, 0, 0, 1]
    a = [_row("todre:0.25", "todre", f"q{i}", s) for i, s in enumerate(method)]
    b = [_row("vis:random:0.25", "vis:random", f"q{i}", s) for i, s in enumerate(random)]
    p = paired(a, b, lambda r: (r["task_options"],))
    assert (p.n, p.both, p.only_a, p.only_b) == (8, 2, 5, 1)
    assert (p.score_a, p.score_b) == (7 / 8, 3 / 8)
    assert p.p == pytest.approx(sign_test(5, 1)) == pytest.approx(2 * 7 / 64)
    full = [_row("full", "full", f"q{i}", 1, "100%") for i in range(9)]
    other = [_row("pool:0.5", "pool", f"q{i}", 1, "50%") for i in range(9)]  # no random at 50 %: not tested
    tests = vlm_sign_tests(a + b + full + other)
    assert [(label, base) for label, base, _ in tests] == [("todre:0.25", "vis:random:0.25")]
    assert tests[0][2] == p


# -------------------------------------------------------------------------------------------------------- CLI
def test_vlm_eval_cli_writes_the_store_and_resumes(small, tmp_path, capsys):
    from tokensieve.cli import main

    model, _ = small
    weights = tmp_path / "run" / "final"
    V.save_vlm(model, weights)
    store = tmp_path / "cli.sqlite"
    argv = ["train", "vlm-eval", "--model", str(weights), "--scenes", "1", "--methods", "pool", "--budgets", "0.25",
            "--threads", "1", "--store", str(store), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    rows = _rows(store)
    assert sorted({r["label"] for r in rows}) == ["full", "pool:0.25"]
    assert len(rows) == 2 * len({r["task_options"] for r in rows})
    assert rows[0]["model"].startswith("run-final-")  # the run folder and a fingerprint of its weights
    assert "| pool:0.25 |" in capsys.readouterr().out
    assert main(argv) == 0  # everything is stored: nothing measured, no run recorded
    with ResultStore(store, readonly=True) as s:
        (run,) = s.runs("vlm-eval")
        assert s.count("eval") == len(rows)
    assert "--store" in run["command"]
    assert main(["train", "vlm-eval", "--model", str(weights), "--store", str(store)]) == 2  # --store needs --methods
    assert "give --methods" in capsys.readouterr().err
