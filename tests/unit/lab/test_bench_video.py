"""`tokensieve bench --video` and `generate-video` on tiny models: rows, ratios, fidelity, the store, refusals."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers")

from tokensieve.adapters.diffusion.embedded import EmbeddedVideoDiT, VideoDiTConfig
from tokensieve.attention import flex
from tokensieve.bench.video import (
    VideoBenchConfig,
    WanGeometry,
    expand_specs,
    model_key,
    run_video_bench,
    summarize,
)
from tokensieve.cli import main
from tokensieve.errors import ConfigError, ModelNotFoundError
from tokensieve.results.store import ResultStore, is_dit

KEEP_ALL = "svg2[dense_layers=0,kc=8,min_kc_ratio=1,qc=4,top_p=1,warmup=0]"


@pytest.fixture(autouse=True)
def _no_compile():
    previous = flex.set_compile(False)
    yield
    flex.set_compile(previous)


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    cfg = VideoDiTConfig(frames=4, size=32, heads=2, head_dim=12, layers=2, ffn=32, text_dim=8, freq_dim=16)
    return EmbeddedVideoDiT(cfg).eval().save(tmp_path / "model")


def test_specs_expand_over_densities_full_first():
    specs = expand_specs("svg,radial,ras:0.5,svg2[top_p=0.8]", "0.25,0.5")
    assert specs == ["full", "svg:0.25", "svg:0.5", "radial", "ras:0.5", "svg2[top_p=0.8]"]
    with pytest.raises(ConfigError, match="KV-cache method"):
        expand_specs("snapkv", "0.25")


def test_embedded_rows_fidelity_and_ratios(tiny_model):
    specs = ("full", KEEP_ALL, "svg[dense_layers=0,warmup=0]:0.5")
    cfg = VideoBenchConfig(workload="embedded", specs=specs, reps=2, steps=2, clips=2, model=str(tiny_model))
    rows = run_video_bench(cfg)
    assert len(rows) == 2 * 2 * 3
    assert {r.prompt for r in rows}
    assert all(r.tokens == 4 * 8 * 8 for r in rows)
    full = [r for r in rows if r.label == "full"]
    assert all(r.psnr == math.inf and r.ssim == pytest.approx(1.0) and r.density == 1.0 for r in full)
    keep = [r for r in rows if r.label == KEEP_ALL]  # keep-all = dense: the same clip, density 1
    assert all(r.psnr is not None and r.psnr > 40 and r.density == pytest.approx(1.0) for r in keep)
    sparse = [r for r in rows if r.label.startswith("svg[")]
    assert len(sparse) == 4
    assert all(r.density < 1.0 and r.attn_s > 0 and r.e2e_s > r.attn_s for r in sparse)
    assert all(r.calls == 2 * 2 and r.sparse_calls == r.calls for r in sparse)  # no dense steps or layers asked
    assert all(r.sparse_attn_s == pytest.approx(r.attn_s) for r in sparse)
    assert all(r.calls == 2 * 2 and r.sparse_calls == 0 for r in full)
    summary = {s["label"]: s for s in summarize(rows)}
    assert summary["full"]["attn_speedup"] == pytest.approx(1.0)
    assert math.isnan(summary["full"]["sparse_speedup"])
    assert summary["full"]["flops_ideal"] == pytest.approx(1.0)
    s = summary["svg[dense_layers=0,warmup=0]:0.5"]
    assert s["flops_ideal"] == pytest.approx(1 / s["density"])
    assert s["ideal_fraction"] == pytest.approx(s["attn_speedup"] * s["density"])
    assert s["sparse_density"] == pytest.approx(s["density"])
    assert s["sparse_ideal_fraction"] == pytest.approx(s["sparse_speedup"] * s["sparse_density"])
    assert 0.0 <= s["gate_color"] <= 1.0


def test_wan_geometry_is_speed_only():
    g = WanGeometry(layers=1, heads=2, head_dim=8, ffn=16, channels=4, text_dim=8, text_tokens=3, freq_dim=16,
                    latent=(2, 4, 4))  # fmt: skip
    assert g.tokens == 2 * 2 * 2
    assert "random-weights" in g.model_key
    assert "1layers" in g.model_key
    cfg = VideoBenchConfig(workload="wan2.1-1.3b", specs=("full", "radial"), reps=1, steps=2, geometry=g)
    rows = run_video_bench(cfg)
    assert [r.label for r in rows] == ["full", "radial"]
    assert all(r.psnr is None and r.gate_color is None for r in rows)
    assert WanGeometry().tokens == 2048
    bad = VideoBenchConfig(workload="wan2.1-1.3b", specs=("full",), reps=1, steps=1, model="/nonexistent/wan")
    with pytest.raises(ModelNotFoundError):
        run_video_bench(bad)


def test_a_folder_that_is_not_a_diffusers_transformer_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "LlamaForCausalLM"}))
    argv = ["bench", "--video", "wan2.1-1.3b", "--video-model", str(tmp_path), "--methods", "radial"]
    assert main(argv) == 2
    assert "not a diffusers transformer" in capsys.readouterr().err


def test_cli_writes_the_store_and_resumes(tiny_model, tmp_path, capsys):
    store = tmp_path / "runs" / "video.sqlite"
    argv = ["bench", "--video", "--video-model", str(tiny_model), "--methods", "svg[warmup=0,dense_layers=0]",
            "--budgets", "0.5", "--steps", "2", "--clips", "1", "--reps", "1", "--threads", "1",
            "--store", str(store), "--report", str(tmp_path / "rep")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "`svg[dense_layers=0,warmup=0]:0.5`" in out
    assert "`full`" in out
    with ResultStore(store, readonly=True) as s:
        rows = s.rows("bench")
    assert len(rows) == 2
    assert all(is_dit(r) for r in rows)
    assert json.loads(rows[0]["spec"])["kind"] == "dit"
    summary = json.loads((tmp_path / "rep" / "video_bench.json").read_text())["summary"]
    assert {x["label"] for x in summary} == {"full", "svg[dense_layers=0,warmup=0]:0.5"}
    png = tmp_path / "rep" / "video_bench.png"  # speed against the FLOPs ideal, PSNR against speed
    assert png.stat().st_size > 5000
    assert "![speed and fidelity](video_bench.png)" in (tmp_path / "rep" / "video_bench.md").read_text()
    assert main(argv) == 0  # resumed: every key is stored, nothing is measured again
    with ResultStore(store, readonly=True) as s:
        assert s.count("bench") == 2
    # the report has a section of its own for them (and none of the language-model sections)
    assert main(["report", str(store), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Video diffusion transformers (tokensieve bench --video)" in text
    assert "`svg[dense_layers=0,warmup=0]:0.5`" in text
    assert "Speed and memory (tokensieve bench)" not in text


def test_generate_video_and_its_refusals(tiny_model, tmp_path, capsys):
    gif = tmp_path / "clip.gif"
    argv = ["generate-video", "a red circle moving right", "--model", str(tiny_model), "--steps", "2", "--out"]
    assert main([*argv, str(gif)]) == 0
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 4
        assert im.size == (128, 128)
    assert main(["generate-video", "a cat playing piano", "--model", str(tiny_model)]) == 2
    assert "cannot condition" in capsys.readouterr().err
    assert main(["generate-video", "a red circle moving right", "--model", str(tmp_path / "none")]) == 2
    assert "tokensieve train video-dit" in capsys.readouterr().err
    assert main([*argv, str(gif), "--spec", "snapkv:0.25"]) == 2
    assert "KV-cache method" in capsys.readouterr().err


def test_every_command_of_the_guide_parses():
    import re
    import shlex
    from pathlib import Path

    from tokensieve.cli import build_parser

    text = (Path(__file__).parents[3] / "docs" / "DIT.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = [
        c for block in blocks for c in block.replace("\\\n", " ").splitlines() if c.strip().startswith("tokensieve ")
    ]
    assert len(commands) >= 9
    parser = build_parser()
    for c in commands:
        argv = shlex.split(c.split("#")[0])[1:]
        args = parser.parse_args(argv)
        assert callable(args.func), c


def test_longer_clips_than_trained(tiny_model, capsys):
    cfg = VideoBenchConfig(workload="embedded", specs=("full", "radial[warmup=0,dense_layers=0,block=64]"), reps=1,
                           steps=1, clips=1, model=str(tiny_model), frames=8)  # fmt: skip
    rows = run_video_bench(cfg)
    assert all(r.tokens == 8 * 8 * 8 for r in rows)  # 8 frames of 8 × 8 patches (the model was trained on 4)
    assert "-8frames@" in model_key(cfg)
    assert str(tiny_model.parent) not in model_key(cfg)  # no machine path: the folder's name and its weights' hash
    assert model_key(cfg).split("@")[1].startswith(tiny_model.name + "-")
    assert model_key(cfg) != model_key(VideoBenchConfig(workload="embedded", model=str(tiny_model)))
    with pytest.raises(ConfigError, match="--frames must be in"):
        run_video_bench(VideoBenchConfig(workload="embedded", specs=("full",), model=str(tiny_model), frames=65))
    assert main(["bench", "--video", "wan2.1-1.3b", "--frames", "16"]) == 2
    assert "--latent" in capsys.readouterr().err
    assert main(["bench", "--frames", "16", "--methods", "full"]) == 2
    assert "belongs to --video" in capsys.readouterr().err
    assert main(["bench", "--video", "wan2.1-1.3b", "--guidance", "4"]) == 2
    assert "embedded model's sampler" in capsys.readouterr().err
    guided = VideoBenchConfig(workload="embedded", specs=("full",), reps=1, steps=1, clips=1, model=str(tiny_model),
                              guidance=3.0)  # fmt: skip
    assert "-guidance3@" in model_key(guided)  # its rows are apart from unguided ones
    plain = replace(guided, guidance=1.0)
    # guidance: two transformer calls per step (with and without the prompt), each through the model's 2 layers
    assert [r.calls for r in run_video_bench(plain)] == [2]
    assert [r.calls for r in run_video_bench(guided)] == [4]
