"""`tokensieve generate --image`: a question about an image to a local vision-language model, with visual-token
pruning and a KV method from one spec; user mistakes are one-line errors before the model loads. A small LLaVA with
random weights, saved as a Hugging Face folder (the embedded text model's tokenizer and first layer)."""

from __future__ import annotations

import pytest
import torch

from tests.unit.core.test_registry_cli import save_tiny
from tokensieve.adapters import vlm as V
from tokensieve.cli import main
from tokensieve.data import scenes as S

SMALL = V.VisionSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, text_layers=1)
QUESTION = "How many objects are there?"


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    from tokensieve.adapters.models import embedded_dir, is_pulled

    if not is_pulled():
        pytest.skip("needs the embedded text model's tokenizer and weights (`tokensieve pull`)")
    torch.manual_seed(0)
    model, processor = V.build_vlm(SMALL, text_dir=embedded_dir())
    path = tmp_path_factory.mktemp("vlm") / "tiny-llava"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    S.make_scene(S.split_seed("test", 0)).render().save(path)
    return path


def _reference(vlm_dir, image_file, n: int) -> str:
    """What transformers' own greedy generate answers, from the same prompt."""
    from PIL import Image

    from tokensieve.adapters.models import load_model

    model, processor = load_model(str(vlm_dir))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    enc = processor(text=text, images=[Image.open(image_file).convert("RGB")], return_tensors="pt")
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    new = [t for t in out[0, enc["input_ids"].shape[1] :].tolist() if t != eos]
    return processor.tokenizer.decode(new, skip_special_tokens=True)


def test_a_local_vlm_folder_loads_with_its_processor(vlm_dir):
    from tokensieve.adapters.models import load_model

    model, processor = load_model(str(vlm_dir))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert hasattr(processor, "image_processor")


def test_generate_with_an_image_equals_transformers_without_pruning(vlm_dir, image_file, capsys):
    argv = ["generate", "--model", str(vlm_dir), "--image", str(image_file), QUESTION, "--max-new-tokens", "5"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out == _reference(vlm_dir, image_file, 5) + "\n"
    assert "[full]" in out.err
    assert "visual tokens llm_input 256" in out.err


def test_generate_with_an_image_prunes_and_compresses(vlm_dir, image_file, capsys):
    argv = ["generate", "--model", str(vlm_dir), "--image", str(image_file), QUESTION, "--max-new-tokens", "3"]
    assert main([*argv, "--spec", "pool:64/snapkv:0.5"]) == 0
    err = capsys.readouterr().err
    assert "[pool:64/snapkv:0.5]" in err
    assert "llm_input 64" in err  # the pooled grid reached the language model


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "snapkv"], "write what to run with --spec"),
        (["--spec", "pool:64/nosuchmethod:0.5"], "nosuchmethod"),
    ],
)
def test_image_mistakes_are_one_line_errors_before_loading(vlm_dir, image_file, capsys, monkeypatch, extra, message):
    import tokensieve.adapters.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    argv = ["generate", "--model", str(vlm_dir), "--image", str(image_file), QUESTION, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokensieve: error:")
    assert message in err
    assert "Traceback" not in err


def test_unreadable_image_and_text_model_are_refused(vlm_dir, tmp_path, tiny_model, capsys):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    assert main(["generate", "--model", str(vlm_dir), "--image", str(bad), QUESTION]) == 2
    assert "Cannot read the image" in capsys.readouterr().err
    text_dir = tmp_path / "text"
    save_tiny(text_dir, tiny_model)
    good = tmp_path / "img.png"
    S.make_scene(S.split_seed("test", 1)).render().save(good)
    assert main(["generate", "--model", str(text_dir), "--image", str(good), "t5 t6"]) == 2
    assert "needs a vision-language model" in capsys.readouterr().err


def test_a_visual_spec_without_an_image_names_what_it_needs(capsys):
    assert main(["generate", "--spec", "pool:64", "hello"]) == 2
    err = capsys.readouterr().err
    assert "'pool' is a visual-token method" in err
    assert "--image" in err
    assert "Traceback" not in err


def test_the_kv_bytes_printed_are_the_caches(vlm_dir, image_file, capsys):
    import re

    argv = ["generate", "--model", str(vlm_dir), "--image", str(image_file), QUESTION, "--max-new-tokens", "2"]
    for spec in ("pool:64/snapkv:0.5", "pool:64"):
        assert main([*argv, "--spec", spec]) == 0
        err = capsys.readouterr().err
        mb = float(re.search(r"KV ([0-9.]+) MB", err).group(1))
        assert mb > 0, err  # the composed SieveCache's bytes (snapkv) or the plain per-layer cache's


def test_text_without_an_image_never_reaches_the_processors_image_input(vlm_dir, capsys, monkeypatch):
    from transformers import AutoProcessor

    processor_class = type(AutoProcessor.from_pretrained(str(vlm_dir)))

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"the processor was called with {args!r}: a prompt would be read as an image")

    monkeypatch.setattr(processor_class, "__call__", refuse)
    for prompt in ("http://127.0.0.1:9/secret.png", "/etc/passwd"):
        assert main(["generate", "--model", str(vlm_dir), prompt, "--max-new-tokens", "2"]) == 0
        assert "[full]" in capsys.readouterr().err


def test_an_image_too_large_to_decode_is_a_clear_error(vlm_dir, tmp_path, capsys):
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    bomb = tmp_path / "bomb.png"  # a 20000 x 20000 header with almost no data: a decompression bomb
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 61)) +
                     chunk(b"IEND", b""))  # fmt: skip
    assert main(["generate", "--model", str(vlm_dir), "--image", str(bomb), QUESTION]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokensieve: error:")
    assert "too large" in err
