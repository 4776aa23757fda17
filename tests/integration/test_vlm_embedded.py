"""The shipped VLM: loads by name through load_model, answers held-out scenes through transformers' own
processor and generate(), and its file holds only what was trained."""

from __future__ import annotations

import random

import pytest
import torch

from tokensieve.adapters import vlm as V
from tokensieve.data import scenes as S

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (V.weights_dir() / "model.safetensors").is_file(),
        reason="the embedded VLM's trained weights are not shipped yet (`tokensieve train vlm`)",
    ),
]


@pytest.fixture(scope="module")
def vlm():
    from tokensieve.adapters.models import is_pulled, load_model

    if not is_pulled():
        pytest.fail("The embedded model is not provisioned: run `make setup` (or `tokensieve pull`) first.")
    return load_model("smollm2-135m-llava")


def test_shipped_file_is_small_and_holds_no_text_weights():
    from safetensors import safe_open

    path = V.weights_dir() / "model.safetensors"
    assert path.stat().st_size <= 40 * 2**20
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
    assert any(n.startswith("model.vision_tower.") for n in names)
    assert not [n for n in names if n.startswith("model.language_model.")]  # only low-rank factors of it


def test_shipped_vlm_answers_held_out_scenes(vlm):
    """Through transformers' own processor and generate(): the question types the shipped model reads (attribute,
    existence, reading: 97.5 % each on 120 test scenes) are answered right, and overall it is well above the
    image-blind prior (79 % against 30 %; spatial questions are at chance, docs/VLM.md says why)."""
    model, processor = vlm
    assert model.config.model_type == "llava"
    tok = processor.tokenizer
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    wrong = []
    for i in range(8):
        scene = S.make_scene(S.split_seed("test", 500 + i))
        for q in S.questions(scene):
            enc = processor(text=V.chat_prompt([(q.text, None)]), images=scene.render(), return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=4, do_sample=False, eos_token_id=tok.eos_token_id)
            answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            right[q.type] = right.get(q.type, 0) + (answer == q.answer)
            total[q.type] = total.get(q.type, 0) + 1
            if answer != q.answer:
                wrong.append((q.text, q.answer, answer))
    read = ("attribute", "existence", "reading")
    assert sum(right[t] for t in read) / sum(total[t] for t in read) >= 0.85, wrong
    assert sum(right.values()) / sum(total.values()) >= 0.65, wrong


def test_generate_with_an_image_answers_a_rendered_scene_by_default(tmp_path, capsys):
    """`tokensieve generate --image FILE "question"` picks the embedded VLM by default and reads the image: the
    colour questions of held-out scenes are answered right (the model reads colours on ≥ 95 % of held-out scenes)."""
    from tokensieve.cli import main

    right, asked = 0, 0
    for i in range(3):
        scene = S.make_scene(S.split_seed("test", 700 + i))
        q = S.ask(scene, "attribute", random.Random(i))
        assert q is not None
        path = tmp_path / f"scene{i}.png"
        scene.render().save(path)
        assert main(["generate", "--image", str(path), q.text, "--max-new-tokens", "4", "--threads", "1"]) == 0
        answer = capsys.readouterr().out.strip()
        right += answer == q.answer
        asked += 1
    assert right >= asked - 1
