"""One model, several threads: each thread's compression (and another thread's plain use of the model) gives
exactly what it gives alone."""

from __future__ import annotations

import threading

import torch

import tokensieve as ts


def _prompt(seed: int, n: int = 60) -> torch.Tensor:
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _lean(model, spec: str, ids: torch.Tensor) -> list[int]:
    press = ts.compress(model, spec)
    return press.decode(press.prefill(ids), 12).tokens[0]


@torch.inference_mode()
def _generate(model, spec: str | None, ids: torch.Tensor) -> list[int]:
    if spec is None:
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    else:
        with ts.compress(model, spec):
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def _run_concurrently(jobs):
    results: dict[int, list[list[int]]] = {i: [] for i in range(len(jobs))}
    errors: list[BaseException] = []

    def work(i, fn):
        try:
            for _ in range(4):
                results[i].append(fn())
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, fn)) for i, fn in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return results


def test_threads_sharing_a_model_get_their_own_results(tiny_model):
    jobs = [
        lambda: _lean(tiny_model, "snapkv:0.5", _prompt(1)),
        lambda: _lean(tiny_model, "full", _prompt(2)),
        lambda: _generate(tiny_model, "knorm:0.5", _prompt(3)),
        lambda: _generate(tiny_model, None, _prompt(4)),  # plain transformers while others compress
    ]
    alone = [job() for job in jobs]
    results = _run_concurrently(jobs)
    for i, expected in enumerate(alone):
        assert results[i] == [expected] * 4, i
    assert tiny_model.config._attn_implementation == "sdpa"  # restored once the last user left
