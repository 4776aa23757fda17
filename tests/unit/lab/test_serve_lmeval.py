"""The lm-evaluation-harness backend's scoring (tokensieve.serve.lmeval.SieveScorer) on a tiny random Llama: the
full-cache log-likelihood equals a plain forward pass, a compressed one equals the library's query-agnostic path,
generations stop at the harness's stop strings; and, where the harness is installed, a local task run through it."""

from __future__ import annotations

import json

import pytest
import torch

import tokensieve as ts
from tests.conftest import make_tiny_model
from tests.unit.lab.serve_helpers import one_thread  # noqa: F401 (an autouse fixture)
from tokensieve.data.testing import CharTokenizer
from tokensieve.serve.lmeval import SieveScorer

TOK = CharTokenizer()


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=11)


def test_full_cache_loglikelihood_equals_a_plain_forward(model):
    scorer = SieveScorer(model, TOK, "full")
    ctx, cont = scorer.split("The cat sat on the ", "mat today")
    assert ctx == TOK("The cat sat on the")["input_ids"]  # the trailing space moved to the continuation
    assert cont == TOK.encode_text(" mat today")
    lp, greedy = scorer.score(ctx, cont)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert lp == pytest.approx(want, abs=1e-4)
    assert greedy == all(int(logp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
    assert scorer.loglikelihood([("The cat sat on the ", "mat today")])[0][0] == pytest.approx(lp)
    assert scorer.rolling("abc") == pytest.approx(scorer.score([TOK.bos_token_id], TOK.encode_text("abc"))[0])


def test_compressed_loglikelihood_is_the_query_agnostic_path(model):
    scorer = SieveScorer(model, TOK, "snapkv:0.25")
    context = "a long context of words that the cache will compress " * 3
    ctx, cont = scorer.split(context, "answer")
    lp, _ = scorer.score(ctx, cont)
    press = ts.compress(model, "snapkv:0.25")
    c = press.prefill(torch.tensor([ctx]))
    first = torch.log_softmax(c.logits, -1)[0, cont[0]]
    rest = press.extend(c, torch.tensor([cont[:-1]]), return_logits=True)
    logp = torch.log_softmax(rest, -1)[0]
    want = float(first) + sum(float(logp[i, t]) for i, t in enumerate(cont[1:]))
    assert lp == pytest.approx(want, abs=1e-5)
    full, _ = SieveScorer(model, TOK, "full").score(ctx, cont)
    assert lp != pytest.approx(full, abs=1e-3)  # the compression changed something


def test_generate_until_batches_and_stops(model):
    scorer = SieveScorer(model, TOK, "snapkv:0.5", max_gen_toks=12, batch_size=4)
    scorer.engine.eos = set()
    prompts = [f"question {i}: what follows?" for i in range(3)]
    free = scorer.generate([(p, {"until": [], "max_gen_toks": 12}) for p in prompts])
    for p, text in zip(prompts, free):
        press = ts.compress(model, "snapkv:0.5")
        ctx = press.prefill(torch.tensor([TOK(p)["input_ids"]]), reserve=12)
        assert text == TOK.decode(press.decode(ctx, 12).tokens[0], skip_special_tokens=True)
    k = next(k for k, text in enumerate(free) if len(text) >= 6)  # special tokens decode to nothing
    stop = free[k][3:5]
    cut = scorer.generate([(prompts[k], {"until": [stop], "max_gen_toks": 12})])
    assert cut == [free[k][: free[k].find(stop)]]


def test_a_local_task_through_lm_eval(tmp_path, model, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tests.unit.core.test_registry_cli import save_tiny
    from tokensieve.serve.lmeval import register

    register()
    save_tiny(tmp_path / "tiny", model)  # word-level tokenizer: "t5 t6" -> [5, 6]
    rows = [{"question": f"t{3 + i} t{4 + i} t{5 + i}", "choices": [f"t{6 + i}", f"t{40 + i}"], "answer": 0}
            for i in range(6)]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ts_local.yaml").write_text(
        "task: ts_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "target_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n"
    )
    out = lm_eval.simple_evaluate(
        model="tokensieve",
        model_args=f"pretrained={tmp_path / 'tiny'},spec=snapkv:0.5,threads=1",
        tasks=["ts_local"],
        task_manager=TaskManager(include_path=str(tasks)),
        bootstrap_iters=0,
    )
    acc = out["results"]["ts_local"]["acc,none"]
    # the same choice by hand: the continuation with the higher log-likelihood after the compressed context
    from tokensieve.adapters.models import load_model

    m, tok = load_model(str(tmp_path / "tiny"))
    scorer = SieveScorer(m, tok, "snapkv:0.5")
    hits = []
    for r in rows:
        scores = [scorer.loglikelihood([(r["question"], " " + c)])[0][0] for c in r["choices"]]
        hits.append(int(max(range(2), key=lambda k: scores[k]) == r["answer"]))
    assert acc == pytest.approx(sum(hits) / len(hits))
