"""The embedded video DiT's pieces: prompts, sampling (batch = single), the clips and their quality gate."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tokensieve.adapters.diffusion import sparsify
from tokensieve.adapters.diffusion.embedded import EmbeddedVideoDiT, VideoDiTConfig, load_embedded, sample
from tokensieve.attention import flex
from tokensieve.data.clips import all_prompts, gate, gate_rates, make_clip, psnr, ssim
from tokensieve.errors import ModelNotFoundError, PromptError


def tiny() -> EmbeddedVideoDiT:
    torch.manual_seed(0)
    return EmbeddedVideoDiT(VideoDiTConfig(frames=2, size=16, heads=2, head_dim=12, layers=2, ffn=32, text_dim=8,
                                           freq_dim=16)).eval()  # fmt: skip


def test_prompts_are_parsed_or_refused():
    m = tiny()
    assert m.parse("A Red circle  moving right") == ("red", "circle", "right")
    with pytest.raises(PromptError, match="unknown color 'pink'"):
        m.parse("a pink circle moving right")
    with pytest.raises(PromptError, match="cannot condition"):
        m.parse("draw me a cat")
    assert len(all_prompts()) == 7 * 3 * 4


def test_sampling_batch_equals_single_and_roundtrip(tmp_path):
    m = tiny()
    prompts = ["a red circle moving right", "a blue square moving up"]
    both = sample(m, prompts, [1, 2], steps=2)
    one = sample(m, prompts[1:], [2], steps=2)
    assert both.shape == (2, 2, 16, 16, 3)
    assert (both[1].int() - one[0].int()).abs().max() <= 1
    m.save(tmp_path / "m")
    again = sample(load_embedded(tmp_path / "m"), prompts[:1], [1], steps=2)
    assert torch.equal(again[0], sample(m, prompts[:1], [1], steps=2)[0])
    with pytest.raises(ModelNotFoundError):
        load_embedded(tmp_path / "nothing")


def test_sampling_under_a_sieve_keep_all_is_dense():
    previous = flex.set_compile(False)
    try:
        m = tiny()
        dense = sample(m, ["a red circle moving right"], [3], steps=3)
        with sparsify(m.transformer, "svg2[qc=4,kc=8,top_p=1,min_kc_ratio=1,warmup=0,dense_layers=0]") as sieve:
            got = sample(m, ["a red circle moving right"], [3], steps=3, sieve=sieve)
        assert (got.int() - dense.int()).abs().max() <= 1
    finally:
        flex.set_compile(previous)


def test_procedural_clips_pass_the_gate_and_wrong_prompts_fail():
    results, wrong = [], []
    for i in range(20):
        clip = make_clip(1000 + i)
        results.append(gate(clip.frames, clip.prompt))
        flipped = {"right": "left", "left": "right", "up": "down", "down": "up"}[clip.direction]
        other = "blue" if clip.color != "blue" else "red"
        wrong.append(gate(clip.frames, f"a {other} {clip.shape} moving {flipped}"))
    assert gate_rates(results) == (1.0, 1.0)
    assert gate_rates(wrong) == (0.0, 0.0)


def test_fidelity_metrics():
    a = make_clip(5).frames
    assert psnr(a, a) == float("inf")
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
    assert 20 < psnr(a, noisy) < 40
    assert 0 < ssim(a, noisy) < 1


def _tiny_cfg() -> VideoDiTConfig:
    return VideoDiTConfig(frames=2, size=16, heads=2, head_dim=12, layers=2, ffn=32, text_dim=8, freq_dim=16)


def test_training_in_chunks_equals_training_in_one_go(tmp_path):
    from tokensieve.train.video_dit import VideoTrainConfig, VideoTrainer

    def run(out, steps):
        cfg = VideoTrainConfig(out=str(out), steps=steps, batch=2, warmup=2, save_every=100, eval_every=0)
        return VideoTrainer(cfg, progress=False, model_cfg=_tiny_cfg()).run()

    run(tmp_path / "chunks", 2)
    spent = json.loads((tmp_path / "chunks" / "minutes.json").read_text())
    assert spent["cpu_from_step"] == 0
    assert spent["minutes"] > 0
    assert spent["cpu_minutes"] > 0
    resumed = VideoTrainer(VideoTrainConfig(out=str(tmp_path / "chunks"), steps=4), progress=False,
                           model_cfg=_tiny_cfg())  # fmt: skip
    assert resumed.step == 2
    final = run(tmp_path / "chunks", 4)
    again = json.loads((tmp_path / "chunks" / "minutes.json").read_text())
    assert again["cpu_from_step"] == 0
    assert again["cpu_minutes"] > spent["cpu_minutes"]  # the chunks' CPU minutes add up
    # a run begun before CPU accounting (wall minutes only) counts CPU from the step it resumes at
    (tmp_path / "chunks" / "minutes.json").write_text(json.dumps({"minutes": 1.0}))
    old = VideoTrainer(VideoTrainConfig(out=str(tmp_path / "chunks"), steps=4), progress=False, model_cfg=_tiny_cfg())
    old._spent()
    assert old._add_spent(2.0, 0.5) == {"minutes": 2.0, "cpu_minutes": 0.5, "cpu_from_step": 4}
    whole = run(tmp_path / "whole", 4)
    a, b = load_embedded(final), load_embedded(whole)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    # a run's directory (or its checkpoint file) loads the weights of its last checkpoint, here the final step's
    for partial in (load_embedded(tmp_path / "whole"), load_embedded(tmp_path / "whole" / "checkpoint.pt")):
        assert partial.cfg == a.cfg
        for (name, x), (_, y) in zip(a.state_dict().items(), partial.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ModelNotFoundError, match="not a checkpoint"):
        load_embedded(tmp_path / "other.pt")
    # a checkpoint of another model size is refused, not silently loaded
    from tokensieve.errors import ConfigError

    with pytest.raises(ConfigError, match="another model configuration"):
        VideoTrainer(VideoTrainConfig(out=str(tmp_path / "whole")), progress=False)


def test_long_clips_stay_inside_the_frame_and_pass_the_gate():
    for i in range(40):
        clip = make_clip(i, frames=16, size=64)
        xs, ys = zip(*clip.centers, strict=True)
        assert min(xs + ys) > 0
        assert max(xs + ys) < 64
        result = gate(clip.frames, clip.prompt)
        assert result.color_ok
        assert result.motion_ok


def test_training_log_reports_loss_speed_and_time_left(tmp_path):
    import json

    from tokensieve.train.video_dit import VideoTrainConfig, VideoTrainer

    cfg = VideoTrainConfig(out=str(tmp_path), steps=100, batch=1, warmup=2, save_every=1000, eval_every=0, minutes=0)
    VideoTrainer(cfg, progress=False, model_cfg=_tiny_cfg()).run()
    lines = [json.loads(x) for x in (tmp_path / "train.log").read_text().splitlines()]
    assert lines[0]["invocation"]["steps"] == 100  # the settings of the chunk
    assert lines[0]["resumed_at_step"] == 0
    lines = lines[1:]
    assert [x["step"] for x in lines] == [50, 100]
    assert all(x["s_per_step"] > 0 and np.isfinite(x["loss"]) for x in lines)
    assert lines[0]["eta_minutes"] == pytest.approx(lines[0]["s_per_step"] * 50 / 60, abs=0.06)  # 50 steps left
    assert lines[1]["eta_minutes"] == 0


def test_final_weights_are_the_moving_average_and_the_sampler_uses_the_trained_shift(tmp_path):
    from tokensieve.train.video_dit import VideoTrainConfig, VideoTrainer

    def trainer(out, ema):
        cfg = VideoTrainConfig(out=str(out), steps=3, batch=1, warmup=1, save_every=100, eval_every=0, ema=ema,
                               shift=3.0)  # fmt: skip
        return VideoTrainer(cfg, progress=False, model_cfg=_tiny_cfg())  # the model takes the training's shift

    plain = trainer(tmp_path / "plain", ema=0.0)
    avg = {k: v.clone() for k, v in plain.model.state_dict().items()}  # the average by hand, from the initial weights
    for step in range(1, 4):
        plain.train_step()
        d = min(0.9, (1 + step) / (10 + step))
        avg = {k: d * a + (1 - d) * plain.model.state_dict()[k] for k, a in avg.items()}
    final = plain.run()  # at its last step already: writes final/, the last weights (no averaging)
    for model in (load_embedded(final), load_embedded(tmp_path / "plain")):  # final/ and the checkpoint
        for name, x in model.state_dict().items():
            assert torch.equal(x, plain.model.state_dict()[name]), name
    final = trainer(tmp_path / "avg", ema=0.9).run()
    state = torch.load(tmp_path / "avg" / "checkpoint.pt", weights_only=True)
    for name, x in state["model"].items():  # averaging does not change the training
        assert torch.equal(x, plain.model.state_dict()[name]), name
    for model in (load_embedded(final), load_embedded(tmp_path / "avg")):  # final/ and the checkpoint: the average
        for name, x in model.state_dict().items():
            torch.testing.assert_close(x, avg[name], atol=1e-6, rtol=1e-5)
    m = load_embedded(final)
    assert m.cfg.shift == 3.0
    prompt = "a red circle moving right"
    assert torch.equal(sample(m, [prompt], [1], steps=3), sample(m, [prompt], [1], steps=3, shift=3.0))
    assert not torch.equal(sample(m, [prompt], [1], steps=3), sample(m, [prompt], [1], steps=3, shift=1.0))


def test_a_checkpoint_from_before_averaging_and_shift_resumes(tmp_path):
    from tokensieve.train.video_dit import VideoTrainConfig, VideoTrainer

    cfg = VideoTrainConfig(out=str(tmp_path), steps=2, batch=1, warmup=1, save_every=100, eval_every=0, ema=0.0,
                           shift=1.0)  # fmt: skip
    VideoTrainer(cfg, progress=False, model_cfg=_tiny_cfg()).run()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "ema" not in state  # no averaging: none stored
    del state["model_config"]["shift"]  # written before the shift existed
    del state["config"]["shift"], state["config"]["ema"]
    torch.save(state, tmp_path / "checkpoint.pt")
    resumed = VideoTrainer(replace(cfg, steps=3, ema=0.9, shift=3.0), progress=False, model_cfg=_tiny_cfg())
    assert resumed.step == 2
    assert resumed.changed == {"steps": [2, 3], "shift": [1.0, 3.0], "ema": [0.0, 0.9]}  # logged with the chunk
    for name, x in resumed.ema.items():  # the average starts from the checkpoint's weights
        assert torch.equal(x, state["model"][name]), name
    resumed.run()
    log = [json.loads(x) for x in (tmp_path / "train.log").read_text().splitlines()]
    chunks = [x for x in log if "invocation" in x]
    assert "changed" not in chunks[0]
    assert chunks[1]["changed"]["shift"] == [1.0, 3.0]
    assert load_embedded(tmp_path / "final").cfg.shift == 3.0


def test_sampling_other_clip_lengths():
    m = tiny()
    clip = sample(m, ["a red circle moving right"], [1], steps=1, frames=5)
    assert clip.shape == (1, 5, 16, 16, 3)
    from tokensieve.errors import ConfigError

    with pytest.raises(ConfigError, match="frames must be in"):
        sample(m, ["a red circle moving right"], [1], steps=1, frames=65)


def test_coordinate_channels_span_the_clip():
    from tokensieve.adapters.diffusion.embedded import coordinates

    c = coordinates(torch.zeros(2, 3, 4, 8, 16))
    assert c.shape == (2, 3, 4, 8, 16)
    t, y, x = c[0]
    assert torch.allclose(t[:, 0, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    assert torch.equal(y[0, :, 0], torch.linspace(-1, 1, 8))
    assert torch.equal(x[0, 0], torch.linspace(-1, 1, 16))
    assert torch.equal(coordinates(torch.zeros(1, 3, 1, 2, 2))[0, 0], torch.zeros(1, 2, 2))  # one frame: t = 0
    assert EmbeddedVideoDiT(_tiny_cfg()).transformer.patch_embedding.in_channels == 6
    assert EmbeddedVideoDiT(replace(_tiny_cfg(), coords=False)).transformer.patch_embedding.in_channels == 3


def test_a_run_without_coordinates_resumes_with_them_widened(tmp_path):
    from tokensieve.adapters.diffusion.embedded import config_of
    from tokensieve.errors import ConfigError
    from tokensieve.train.video_dit import VideoTrainConfig, VideoTrainer

    def trainer(steps, coords):
        cfg = VideoTrainConfig(out=str(tmp_path / "run"), steps=steps, batch=2, warmup=2, save_every=100, eval_every=0,
                               coords=coords)  # fmt: skip
        return VideoTrainer(cfg, progress=False, model_cfg=replace(_tiny_cfg(), coords=coords))

    trainer(2, False).run()
    rgb = load_embedded(tmp_path / "run")
    assert not rgb.cfg.coords
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert config_of({k: v for k, v in state["model_config"].items() if k != "coords"}).coords is False  # older files
    wide = trainer(3, True)
    assert wide.step == 2
    assert wide.model.cfg.coords
    # zero weights for the new channels: the widened model (its moving average, as the RGB run's) computes the same
    x, sigma = torch.randn(1, 3, 2, 16, 16), torch.tensor([0.7])
    with torch.no_grad():
        prompt = ["a red circle moving up"]
        assert torch.allclose(wide.averaged()(x, sigma, prompt), rgb(x, sigma, prompt), atol=1e-5)
    assert wide.changed["coords"] == [False, True]
    final = wide.run()  # the optimizer's moments were widened too: a step runs
    assert load_embedded(final).cfg.coords
    with pytest.raises(ConfigError, match="cannot be removed"):
        trainer(4, False)


def test_a_curriculum_changes_the_frames_between_chunks_and_bf16_trains(tmp_path):
    from tokensieve.train.video_dit import VideoTrainConfig, VideoTrainer

    def trainer(steps, frames, bf16=False):
        cfg = VideoTrainConfig(out=str(tmp_path / "run"), steps=steps, batch=2, warmup=2, save_every=100, eval_every=0,
                               bf16=bf16)  # fmt: skip
        return VideoTrainer(cfg, progress=False, model_cfg=replace(_tiny_cfg(), frames=frames))

    trainer(2, 2).run()
    longer = trainer(3, 4, bf16=True)
    assert longer.step == 2
    assert longer.changed == {"steps": [2, 3], "bf16": [False, True]}
    loss = longer.train_step()
    assert np.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in longer.model.parameters())
    longer.run()
    assert load_embedded(tmp_path / "run" / "final").cfg.frames == 4


def test_sampling_from_a_noised_clip():
    from tokensieve.errors import ConfigError

    torch.manual_seed(0)
    m = EmbeddedVideoDiT(replace(_tiny_cfg(), prediction="v")).eval()  # a small random velocity: the clip comes back
    clip = torch.from_numpy(make_clip(4, frames=2, size=16).frames)[None]
    prompt = ["a red circle moving right"]
    full = sample(m, prompt, [4], steps=4)
    # from σ0 = 1 the clip is weighted 0: the same as sampling from noise
    assert torch.equal(sample(m, prompt, [4], steps=4, start=(clip, 1.0)), full)
    late = sample(m, prompt, [4], steps=4, start=(clip, 0.01))  # barely noised: the clip comes back
    assert (late.int() - clip.int()).abs().float().mean() < 8
    with pytest.raises(ConfigError, match="start"):
        sample(m, prompt, [4], steps=4, start=(clip, 1.5))


def test_video_gate_command_reports_intervals_and_refuses_bad_options(tmp_path, capsys):
    from tokensieve.cli import main

    tiny().save(tmp_path / "m")
    assert main(["train", "video-gate", "--model", str(tmp_path / "m"), "--clips", "2", "--steps", "1",
                 "--from-sigma", "0.5"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["clips"] == 2
    assert report["from_sigma"] == 0.5
    assert 0 <= report["motion_ci95"][0] <= report["gate_motion"] <= report["motion_ci95"][1] <= 1
    assert main(["train", "video-gate", "--model", str(tmp_path / "m"), "--from-sigma", "0"]) == 2
    assert "--from-sigma" in capsys.readouterr().err


def test_x_prediction_gives_the_velocity_of_its_clean_clip():
    from tokensieve.adapters.diffusion.embedded import MIN_SIGMA, config_of
    from tokensieve.errors import ConfigError

    m = EmbeddedVideoDiT(replace(_tiny_cfg(), prediction="x")).eval()
    v_model = EmbeddedVideoDiT(replace(_tiny_cfg(), prediction="v")).eval()
    v_model.load_state_dict(m.state_dict())  # the same transformer: its output read as x̂_0, or as the velocity
    x = torch.randn(2, 3, 2, 16, 16)
    sigma = torch.tensor([0.5, 0.01])
    prompts = ["a red circle moving up", None]
    with torch.no_grad():
        x0_hat = v_model(x, sigma, prompts)
        got = m(x, sigma, prompts)
    want = torch.stack([(x[0] - x0_hat[0]) / 0.5, (x[1] - x0_hat[1]) / MIN_SIGMA])  # σ floored at MIN_SIGMA
    torch.testing.assert_close(got, want)
    assert config_of({"patch": [1, 4, 4]}).prediction == "v"  # a model saved before the option: velocity
    with pytest.raises(ConfigError, match="prediction"):
        EmbeddedVideoDiT(replace(_tiny_cfg(), prediction="eps"))
