"""The registry matrix of the visual family, like the KV methods' (tests/unit/methods/kv/test_methods_matrix.py):
every registered visual method, on the tiny LLaVA-1.5 and LLaVA-NeXT models, through the one entry point
(``tokensieve.compress(vlm, spec).prefill(processor_output)``):

- keep everything (budget 1.0) = the unpruned model's logits at every position;
- a left-padded batch (samples with one, two and no images) = each sample alone: logits, kept tokens at every stage
  and step (per image at the vision stage, per sample after it), visual-token counts, greedy continuations;
- exact counts: each stage's method keeps its budget of every image's tokens (a ratio of the tokens that reach it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import tokensieve as ts
from tokensieve.core.budget import Budget
from tokensieve.registry import get_method_class, method_names

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vlm_tiny as vt

ATOL = 2e-5
VISUAL = method_names("visual")
NEXT_SIZES = [[(32, 64)], [(40, 64), (64, 64)], []]
IMAGES = [1, 2, 0]  # images per sample of both batches


def _spec(name: str, budget: str) -> str:
    return f"{'vis:' if name in method_names() else ''}{name}:{budget}"


@pytest.fixture(scope="module")
def families() -> dict[str, tuple[Any, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]]:
    llava = vt.llava()
    inp, singles = vt.llava_batch((3, 7, 1), tuple(IMAGES))
    nxt = vt.llava_next()
    ninp = vt.next_inputs(nxt, [3, 1, 4], NEXT_SIZES)
    return {
        "llava": (llava, inp, singles),
        "llava_next": (nxt, ninp, [vt.next_select(ninp, b, NEXT_SIZES) for b in range(3)]),
    }


def test_every_visual_method_is_in_the_matrix():
    assert len(VISUAL) == 13
    assert all(get_method_class(n, "visual").family == "visual" for n in VISUAL)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("name", VISUAL)
@torch.inference_mode()
def test_keeping_every_token_gives_the_unpruned_model(name, family, families):
    model, _, singles = families[family]
    for one in singles[:2]:
        ref = model(**one).logits.float()
        ctx = ts.compress(model, _spec(name, "1.0")).prefill_images(one, all_logits=True)
        assert ctx.vision.all_logits is not None
        torch.testing.assert_close(ctx.vision.all_logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("name", VISUAL)
@torch.inference_mode()
def test_a_batch_equals_each_sample_alone(name, family, families):
    model, inp, singles = families[family]
    press = ts.compress(model, _spec(name, "0.25"))
    batch = press.prefill_images(inp, seeds=[1, 2, 3])
    first = batch.logits.clone()  # decoding moves the context on
    gen = press.decode(batch, 3)
    for b, one in enumerate(singles):
        alone = press.prefill_images(one, seeds=[b + 1])
        torch.testing.assert_close(first[b : b + 1], alone.logits, atol=ATOL, rtol=0)
        for stage, kept in batch.kept.items():
            if stage == "vision":  # one result per image, the batch's images in order
                first_image = sum(IMAGES[:b])
                mine = [k.index.tolist() for k in kept[first_image : first_image + IMAGES[b]]]
                assert mine == [k.index.tolist() for k in alone.kept.get(stage, [])], (stage, b)
            else:  # one result per sample
                assert kept[b].index.tolist() == alone.kept[stage][0].index.tolist(), (stage, b)
        assert {k: v[b] for k, v in batch.visual_tokens.items()} == {k: v[0] for k, v in alone.visual_tokens.items()}
        assert gen.tokens[b] == press.decode(alone, 3).tokens[0]


@pytest.mark.parametrize("name", VISUAL)
@torch.inference_mode()
def test_each_stage_keeps_exactly_its_budget(name, families):
    model, inp, _ = families["llava"]
    method = get_method_class(name, "visual")()
    ctx = ts.compress(model, _spec(name, "0.25")).prefill_images(inp)
    key = method.where.value  # at the llm stage: the method's last step
    per_image = Budget.ratio(0.25).tokens_for(16)  # every tiny LLaVA image has 16 visual tokens
    assert ctx.visual_tokens[key] == [per_image * n for n in IMAGES]
    assert ctx.visual_tokens["llm_input"][2] == 0  # the sample without an image
