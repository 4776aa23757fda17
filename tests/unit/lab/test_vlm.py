"""The embedded VLM's construction: a LLaVA with a CLS vision tower, ≥ 256 visual tokens at the right positions, the
training and evaluation paths equal to transformers' own forward, and weights that round-trip through save/load
(vision tower, projector and LoRA factors merged into the text model's own weights)."""

from __future__ import annotations

import random

import pytest
import torch

from tokensieve.adapters import vlm as V
from tokensieve.data import scenes as S

# A small geometry for speed: two ViT layers, the text model's first decoder layer only.
SMALL = V.VisionSpec(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    text_layers=1,
    lora_rank=2,
    lora_alpha=4.0,
    lora_targets=("self_attn.q_proj", "mlp.down_proj"),
)


@pytest.fixture(scope="module")
def text_dir():
    from tokensieve.adapters.models import embedded_dir, is_pulled

    if not is_pulled():
        pytest.skip("needs the embedded text model's tokenizer and weights (`tokensieve pull`)")
    return embedded_dir()


@pytest.fixture(scope="module")
def small_vlm(text_dir):
    torch.manual_seed(0)
    model, processor = V.build_vlm(SMALL, text_dir=text_dir)
    return model.eval(), processor


def _scene_inputs(processor, index: int = 0):
    scene = S.make_scene(S.split_seed("test", index))
    q = S.questions(scene)[0]
    enc = processor(text=V.chat_prompt([(q.text, q.answer)]), images=scene.render(), return_tensors="pt")
    return scene, q, enc


def test_default_geometry_is_llava_like():
    spec = V.VisionSpec()
    assert spec.num_visual_tokens == 256
    assert spec.grid == 16
    from transformers import LlamaConfig

    cfg = V.vlm_config(LlamaConfig(vocab_size=100, hidden_size=64, num_attention_heads=4), spec, image_token_id=100)
    assert cfg.model_type == "llava"
    assert cfg.vision_config.model_type == "clip_vision_model"
    assert cfg.vision_feature_select_strategy == "default"  # CLS is in the tower, dropped before the projector
    assert cfg.image_seq_length == 256
    assert cfg.text_config.vocab_size == 101
    assert V.spec_of(cfg) == spec


def test_vision_tower_has_a_cls_token_and_the_lm_gets_the_patches(small_vlm):
    model, processor = small_vlm
    _, _, enc = _scene_inputs(processor)
    out = model.model.vision_tower(enc["pixel_values"], output_hidden_states=True)
    assert out.last_hidden_state.shape[1] == SMALL.num_visual_tokens + 1  # CLS + 256 patches
    feats = model.model.get_image_features(pixel_values=enc["pixel_values"], return_dict=True).pooler_output
    assert feats[0].shape == (SMALL.num_visual_tokens, model.config.text_config.hidden_size)


def test_processor_places_256_image_tokens_in_one_span(small_vlm):
    model, processor = small_vlm
    image_id = model.config.image_token_id
    assert image_id == processor.tokenizer.convert_tokens_to_ids(V.IMAGE_TOKEN) == len(processor.tokenizer) - 1
    _, q, enc = _scene_inputs(processor)
    ids = enc["input_ids"]
    assert int((ids == image_id).sum()) == 256
    (span,) = V.image_spans(ids, image_id)[0]
    assert span[1] - span[0] == 256
    assert bool((ids[0, span[0] : span[1]] == image_id).all())
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.text}]}]
    assert processor.apply_chat_template(msgs, add_generation_prompt=True) == V.chat_prompt([(q.text, None)])


def test_image_spans_per_sample():
    ids = torch.tensor([[5, 9, 9, 9, 5, 9], [9, 9, 5, 5, 5, 5]])
    assert V.image_spans(ids, 9) == [[(1, 4), (5, 6)], [(0, 2)]]


def test_encoder_matches_tokenizing_the_whole_conversation(small_vlm):
    from tokensieve.train.batches import Encoder, sample_questions

    _, processor = small_vlm
    tok = processor.tokenizer
    enc = Encoder(tok, 256)
    for i in range(20):
        scene = S.make_scene(S.split_seed("train", i))
        qs = sample_questions(scene, random.Random(i), 1 + i % 6)
        e = enc.conversation(qs)
        text = V.chat_prompt([(q.text, q.answer) for q in qs]).replace(V.IMAGE_TOKEN, V.IMAGE_TOKEN * 256)
        assert tok(text, add_special_tokens=False)["input_ids"] == [*e.ids, *tok("\n")["input_ids"]]
        answers = tok.decode([t for t in e.targets if t != -100])
        assert answers == "".join(f"{q.answer}<|im_end|>" for q in qs)


def test_training_and_evaluation_paths_equal_the_transformers_forward(small_vlm):
    from tokensieve.train.batches import Encoder, collate
    from tokensieve.train.evaluate import answer_scene, keep_indices
    from tokensieve.train.vlm import lm_loss, vision_forward

    model, processor = small_vlm
    _scene, q, enc = _scene_inputs(processor, 3)
    with torch.no_grad():
        ref = model(**enc).logits[0]
        _, _, visual = vision_forward(model, enc["pixel_values"])
        encoder = Encoder(processor.tokenizer, 256)
        e = encoder.conversation([q])
        batch = collate([e], 0)
        loss, _right = lm_loss(model, visual, batch, autocast_bf16=False)
        sel = batch["targets"][0] != -100
        expected = torch.nn.functional.cross_entropy(ref[: len(e.ids)][sel], batch["targets"][0][sel])
        assert torch.allclose(loss, expected, atol=1e-4)
        # the evaluation's cached prefix + batched questions gives the same greedy tokens as the full forward
        (result,) = answer_scene(model, encoder, visual[0], [q], keep_indices(256, 1.0, 0))
        pred = ref[: len(e.ids)][sel].argmax(-1)
        assert result[1] == bool((pred == batch["targets"][0][sel]).all())


def test_keep_indices():
    from tokensieve.train.evaluate import keep_indices

    k = keep_indices(256, 0.11, seed=3)
    assert len(k) == 28
    assert bool((k[1:] > k[:-1]).all())
    assert torch.equal(k, keep_indices(256, 0.11, seed=3))
    assert not torch.equal(k, keep_indices(256, 0.11, seed=4))
    assert torch.equal(keep_indices(256, 1.0, 0), torch.arange(256))


def test_weights_round_trip_with_lora_merged(small_vlm, tmp_path):
    from tokensieve.train.lora import add_lora, lora_factors

    torch.manual_seed(1)
    model, processor = V.build_vlm(SMALL)
    wrapped = add_lora(model.model.language_model, SMALL.lora_targets, SMALL.lora_rank, SMALL.lora_scale,
                       prefix="model.language_model.")  # fmt: skip
    with torch.no_grad():
        for m in wrapped.values():
            m.lora_b.normal_(0, 0.05)
    _, _, enc = _scene_inputs(processor, 1)
    model.eval()
    with torch.no_grad():
        ref = model(**enc).logits
    path = V.save_vlm(model, tmp_path, lora=lora_factors(wrapped), meta={"note": "test"})
    names = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(path)))
    assert not any(".language_model." in n and not n.startswith(V.LORA_PREFIX) for n in names)  # no text weights
    loaded, _ = V.load_vlm(str(tmp_path))
    with torch.no_grad():
        got = loaded(**enc).logits
    assert torch.allclose(got, ref, atol=1e-4)
    assert not any("lora" in n for n, _ in loaded.named_parameters())  # a plain LlavaForConditionalGeneration


SCRATCH = V.VisionSpec(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    text_layers=2,
    text_hidden=32,
    text_heads=4,
    text_kv_heads=2,
)


def test_from_scratch_decoder_geometry_and_round_trip(text_dir, tmp_path):
    """A language model trained from scratch: its geometry follows the spec (GQA, SmolLM2's tokenizer and RoPE), its
    embeddings start as SmolLM2's on their principal directions, and all of it is shipped (the tied head once, the
    embedding matrix as float16) and loads back to the same logits up to that rounding."""
    from safetensors.torch import load_file

    torch.manual_seed(2)
    model, processor = V.build_vlm(SCRATCH, text_dir=text_dir)
    text = model.config.text_config
    geometry = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads)
    assert geometry == (32, 2, 4, 2)
    assert text.vocab_size == len(processor.tokenizer)
    emb = model.model.language_model.embed_tokens.weight.detach()
    assert float(emb[-1].abs().sum()) == 0.0  # the <image> row
    # embeddings keep SmolLM2's neighbourhoods: " red" is closer to " blue" than to a random rare token
    tok = processor.tokenizer
    red, blue, odd = (tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("red", "blue", "zyg"))
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(emb[red], emb[blue], dim=0)) > float(cos(emb[red], emb[odd], dim=0))
    with torch.no_grad():  # a trained model's embeddings are exact in float16
        emb.copy_(emb.half().float())
    _, _, enc = _scene_inputs(processor, 2)
    model.eval()
    with torch.no_grad():
        ref = model(**enc).logits
    path = V.save_vlm(model, tmp_path)
    stored = load_file(str(path))
    assert stored["model.language_model.embed_tokens.weight"].dtype == torch.float16
    assert "lm_head.weight" not in stored  # tied to the embeddings
    assert any(k.startswith("model.language_model.layers.1.") for k in stored)
    loaded, _ = V.load_vlm(str(tmp_path))
    with torch.no_grad():
        got = loaded(**enc).logits
    assert torch.allclose(got, ref, atol=1e-4)


def test_from_scratch_geometry_errors():
    from transformers import LlamaConfig

    from tokensieve.errors import ConfigError

    base = LlamaConfig(vocab_size=100, hidden_size=64, num_attention_heads=4)
    with pytest.raises(ConfigError, match="text_layers"):
        V.vlm_config(base, V.VisionSpec(text_hidden=64), image_token_id=100)
    with pytest.raises(ConfigError, match="split"):
        V.vlm_config(base, V.VisionSpec(text_layers=2, text_hidden=64, text_heads=3), image_token_id=100)


def test_visual_spec_evaluation_agrees_with_the_legacy_path_and_counts(small_vlm):
    """The method comparison (through the pruning adapters, five questions batched) gives the same right/wrong per
    question as the cached-prefix evaluation when nothing is pruned; a pruned spec runs on the same questions."""
    from tokensieve.train.evaluate import evaluate, evaluate_specs, spec_table, visual_specs

    model, processor = small_vlm
    specs = visual_specs("pool,vis:random[stage=vision,layer=1]:0.5", "0.25")
    assert specs == ["full", "pool:0.25", "vis:random[stage=vision,layer=1]:0.5"]
    got = evaluate_specs(model, processor, specs, n_scenes=2, progress=False)
    legacy = evaluate(model, processor, n_scenes=2, fractions=(1.0,), progress=False)[1.0]
    assert dict(got["full"].right) == dict(legacy.right)
    assert dict(got["full"].total) == dict(legacy.total)
    assert all(a.count() == 10 for a in got.values())
    table = spec_table(got)
    assert table.count("\n") == 1 + len(specs)
    assert "pool:0.25" in table


def test_wilson_interval():
    from tokensieve.results.stats import wilson

    lo, hi = wilson(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.2775, abs=1e-4)  # the textbook value for 0 of 10
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson(0, 0) == (0.0, 1.0)


def test_interval_is_wilson_for_proportions_and_normal_otherwise():
    from tokensieve.results.stats import interval, wilson

    assert interval([1, 0, 1, 1]) == wilson(3, 4)
    lo, hi = interval([2.0, 4.0])  # mean 3, standard error 1
    assert (lo, hi) == (pytest.approx(3 - 1.96), pytest.approx(3 + 1.96))
    assert all(x != x for x in interval([2.5]))  # one non-binary value: no interval (NaN)


def test_packed_questions_equal_each_question_asked_alone(small_vlm):
    """Every branch of a packed image pass gets exactly the logits of its question asked alone after the image."""
    from tokensieve.train.batches import Encoder, collate, training_questions
    from tokensieve.train.vlm import lm_loss, vision_forward

    model, processor = small_vlm
    encoder = Encoder(processor.tokenizer, 256)
    scene, counting = S.balanced_scene(S.split_seed("train", 7))
    qs = [*training_questions(scene, counting, random.Random(0), 5), S.caption(scene)]
    other = S.make_scene(S.split_seed("train", 8))
    qs2 = training_questions(other, None, random.Random(1), 3)
    pv = torch.cat(
        [
            processor(text=V.chat_prompt([("x", None)]), images=s.render(), return_tensors="pt")["pixel_values"]
            for s in (scene, other)
        ]
    )
    with torch.no_grad():
        _, _, visual = vision_forward(model, pv)
        packed = collate([encoder.packed(qs), encoder.packed(qs2)], 0)  # two images of different lengths: padding
        assert packed["attention_mask"].shape[:2] == (2, 1)
        loss, right = lm_loss(model, visual, packed, autocast_bf16=False)
        losses, n = [], 0
        for img, group in ((0, qs), (1, qs2)):
            for q in group:
                alone = collate([encoder.conversation([q])], 0)
                lo, r = lm_loss(model, visual[img : img + 1], alone, autocast_bf16=False)
                losses.append(lo * r.numel())
                n += r.numel()
        assert right.numel() == n
        assert torch.allclose(loss, torch.stack(losses).sum() / n, atol=1e-5)


def test_balanced_scenes_answer_their_counting_question():
    from collections import Counter

    answers: Counter[str] = Counter()
    for i in range(400):
        scene, q = S.balanced_scene(S.split_seed("train", i), 1, 7)
        assert 1 <= len(scene.objects) <= 7
        words = q.text.split()
        if words[2] == "objects":
            assert q.answer == str(len(scene.objects))
        else:
            value = words[2][:-1] if words[2].endswith("s") and words[2][:-1] in S.SHAPES else words[2]
            attr = "shape" if value in S.SHAPES else "color" if value in S.COLORS else "size"
            assert q.answer == str(sum(getattr(o, attr) == value for o in scene.objects))
            answers[q.answer] += 1
    # every count 0..7 is drawn about equally often for a colour, shape or size (uniform: 1/8 each)
    assert set(answers) == {str(k) for k in range(8)}
    assert max(answers.values()) < 2.2 * min(answers.values())
    cap = S.caption(scene)
    assert cap.answer.count(",") == len(scene.objects) - 1


def _tiny_train_config(out, **kw):
    from tokensieve.train.vlm import TrainConfig

    base = {
        "out": str(out), "hidden_size": 32, "num_layers": 2, "num_heads": 2, "text_layers": 1, "lora_rank": 2,
        "lora_alpha": 2.0, "lora_targets": "self_attn.q_proj", "vision_steps": 2, "vision_batch": 2, "steps": 2,
        "batch": 1, "turns": 2, "warmup": 1, "checkpoint_every": 1, "log_every": 1, "threads": 1, "eval_every": 2,
        "eval_scenes": 1,
    }  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_training_resumes_at_the_language_stage_with_new_settings(text_dir, tmp_path):
    """Stopping after stage 1 and resuming gives the uninterrupted run's weights; until the language stage has taken
    a step its settings may change, afterwards a changed setting is refused; every process's chunk is recorded."""
    from safetensors.torch import load_file

    from tokensieve.train.vlm import Trainer

    Trainer(_tiny_train_config(tmp_path / "a"), progress=False, command="a").run()
    Trainer(_tiny_train_config(tmp_path / "b", steps=0, caption=False), progress=False, command="b1").run()
    Trainer(_tiny_train_config(tmp_path / "b"), progress=False, command="b2").run()
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)
    record = __import__("json").loads((tmp_path / "b" / "final" / "train.json").read_text())
    assert [c["command"] for c in record["chunks"]] == ["b1", "b2"]
    assert record["chunks"][1]["from"] == "language 0"
    assert record["cpu_hours"] >= 0
    log = (tmp_path / "b" / "train.log").read_text().splitlines()
    assert any("eval_overall" in line for line in log)  # the periodic validation accuracy
    with pytest.raises(SystemExit, match="other settings"):
        Trainer(_tiny_train_config(tmp_path / "b", lr_lora=1e-2), progress=False).run()


def test_wsd_schedule_and_when_a_run_may_grow():
    from tokensieve.train.vlm import TrainConfig, _lr_factor, decay_start, steps_may_change

    assert [round(_lr_factor(s, 100, 10, "wsd", 0.2), 3) for s in (0, 9, 10, 79)] == [0.1, 1.0, 1.0, 1.0]
    assert decay_start(100, 10, 0.2) == 80
    assert _lr_factor(80, 100, 10, "wsd", 0.2) == 1.0
    assert 0.1 < _lr_factor(90, 100, 10, "wsd", 0.2) < 1.0
    assert abs(_lr_factor(100, 100, 10, "wsd", 0.2) - 0.1) < 1e-9
    wsd = TrainConfig(schedule="wsd", steps=1000, decay=0.2, warmup=50)
    assert steps_may_change(wsd, TrainConfig(schedule="wsd", steps=3000, decay=0.2, warmup=50), 799)
    assert not steps_may_change(wsd, TrainConfig(schedule="wsd", steps=3000, decay=0.2, warmup=50), 800)  # decaying
    assert not steps_may_change(wsd, TrainConfig(schedule="wsd", steps=500, decay=0.2, warmup=50), 450)
    assert not steps_may_change(TrainConfig(steps=1000), TrainConfig(steps=3000), 10)  # cosine: every rate moves


def test_vlm_eval_json_prior_and_image_swap_control(small_vlm, tmp_path):
    """`train vlm-eval --json` writes overall / per_type / questions, every --keep fraction, the image-blind prior and
    the image-swap control (each scene's questions asked with the next scene's image)."""
    import json

    from tokensieve.cli import main
    from tokensieve.train.evaluate import evaluate, prior_accuracy

    model, _processor = small_vlm
    run = tmp_path / "run"
    V.save_vlm(model, run)
    out = tmp_path / "eval.json"
    argv = ["train", "vlm-eval", "--model", str(run), "--scenes", "3", "--keep", "1,0.5", "--swap-images",
            "--json", str(out), "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert set(data["keep"]) == {"1.0", "0.5"}
    assert data["questions"] == data["keep"]["1.0"]["questions"] == data["swap_images"]["questions"]
    assert data["overall"] == data["keep"]["1.0"]["overall"]
    assert set(data["per_type"]) <= set(S.QUESTION_TYPES)
    assert data["prior"]["overall"] == prior_accuracy(3).overall()
    lo, hi = data["interval"]
    assert lo <= data["overall"] <= hi
    # the control really shows another scene's image: the same as evaluating with the images rotated by one
    swapped = evaluate(model, _processor, n_scenes=3, fractions=(1.0,), swap_images=True, progress=False)[1.0]
    assert data["swap_images"]["right"] == sum(swapped.right.values())


def test_ship_writes_the_home_directory_as_tilde(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from tokensieve.train.vlm import ship

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"weights")
    out = str(Path.home() / ".cache" / "runs" / "vlm")
    record = {"config": {"out": out}, "chunks": [{"command": f"train --out {out}"}]}
    (final / "train.json").write_text(json.dumps(record))
    dst = ship(tmp_path / "run", tmp_path / "package")
    record = json.loads((dst / "train.json").read_text())
    assert record == {"config": {"out": "~/.cache/runs/vlm"}, "chunks": [{"command": "train --out ~/.cache/runs/vlm"}]}
    assert (dst / "model.safetensors").read_bytes() == b"weights"
