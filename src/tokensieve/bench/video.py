"""Video diffusion transformers: ``tokensieve generate-video`` and the measurement ``tokensieve bench --video``.

``tokensieve generate-video PROMPT --out clip.gif`` samples one clip of the embedded video DiT, dense or under a DiT
spec (docs/DIT.md).

``tokensieve bench --video [embedded|wan2.1-1.3b]`` measures DiT methods the way their papers do: every configuration
(a DiT spec, at each density of ``--budgets`` when its method takes one) against the dense model (``full``), in one
run, repetitions interleaved (the order rotates between repetitions, so a drift of a shared machine hits every
configuration), after one untimed warm-up run per configuration (FlexAttention compiles once per shape; compile time
stays out of the figures). Per configuration it records

* ``e2e_s`` — wall time of the whole generation (every denoising step, every layer), and ``attn_s`` — the wall time
  inside the self-attention calls (the sieve times every call the same way, the dense one included);
* ``density`` — the fraction of video query-key pairs the method computed (1 for dense), so the FLOPs ideal of the
  attention speed-up is ``1 / density`` and its achieved fraction ``speed-up × density``; the same per *sparse call*
  (a call past the method's dense warm-up steps and first layers, density < 1, against one dense call), which is
  the kernel's speed-up where the papers' dense steps and layers do not dilute it;
* on the embedded model only: PSNR and SSIM of the clip against the dense clip of the same prompt, noise seed and
  sampler, and the quality gate (:func:`tokensieve.data.clips.gate`) of the clip.

Workloads: ``embedded`` — the shipped video DiT (or ``--video-model DIR``), ``--clips`` test prompts and seeds,
``--steps`` Euler steps; ``wan2.1-1.3b`` — a ``WanTransformer3DModel`` of Wan2.1-T2V-1.3B's geometry (30 layers,
12 heads of 128, FFN 8,960, 16 latent channels, patch 1 × 2 × 2, 512 text tokens of width 4,096) with **random
weights: speed only** (or, with ``--video-model DIR``, a user's Wan transformer folder), on a random latent of
``--latent F,H,W`` (default 8 × 32 × 32: 2,048 tokens) for ``--steps`` forward calls. Every measurement is one
``bench`` row of the results store (``--store``; the key rule of :func:`tokensieve.results.store.dit_key`, the spec
JSON ``{"kind": "dit", ...}``), and ``--report DIR`` writes ``video_bench.md`` and ``video_bench.json`` with the
medians and ratios, and ``video_bench.png`` (each configuration's speed against its FLOPs ideal and, on the embedded
model, its PSNR against its speed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

TOOL = "bench-video"
WORKLOADS = ("embedded", "wan2.1-1.3b")
DEFAULT_METHODS = "svg,svg2,radial,vmoba,psa,adaspa,ras"
DEFAULT_BUDGETS = "0.25,0.5"


# ------------------------------------------------------------------------------------------------ generate-video
def cmd_generate_video(args: argparse.Namespace) -> int:
    import torch

    from ..adapters.diffusion import sparsify
    from ..adapters.diffusion.embedded import load_embedded, sample, write_gif

    torch.set_num_threads(args.threads)
    model = load_embedded(args.model)
    model.parse(args.prompt)  # a prompt the model cannot condition on is refused before any work
    sieve = sparsify(model.transformer, args.spec, num_steps=args.steps) if args.spec != "full" else None
    t0 = time.perf_counter()
    if sieve is not None:
        with sieve:
            video = sample(model, [args.prompt], [args.seed], steps=args.steps, guidance=args.guidance, sieve=sieve)
    else:
        video = sample(model, [args.prompt], [args.seed], steps=args.steps, guidance=args.guidance)
    dt = time.perf_counter() - t0
    path = write_gif(video[0], args.out, scale=args.scale)
    extra = "" if sieve is None else f", attention density {sieve.stats.density():.2f}"
    print(f"{path} ({dt:.1f} s{extra})")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("generate-video", help="a clip of the embedded video DiT as an animated GIF (docs/DIT.md)")
    p.add_argument("prompt", help='e.g. "a red circle moving right"')
    p.add_argument("--out", default="clip.gif")
    p.add_argument(
        "--model",
        default=None,
        help="a final/ folder of `train video-dit`, or a run directory still training "
        "(its checkpoint); default: the shipped model",
    )
    p.add_argument("--spec", default="full", help="a DiT spec, e.g. svg:0.3, radial, svg2[top_p=0.9] (default: dense)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--scale", type=int, default=4, help="upscale the GIF this many times")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_generate_video)


# ------------------------------------------------------------------------------------------------ the benchmark
@dataclass(frozen=True)
class WanGeometry:
    """The transformer of Wan2.1-T2V-1.3B (its diffusers config), with ``layers`` to cut it for a quick look."""

    layers: int = 30
    heads: int = 12
    head_dim: int = 128
    ffn: int = 8960
    channels: int = 16
    text_dim: int = 4096
    text_tokens: int = 512
    freq_dim: int = 256
    patch: tuple[int, int, int] = (1, 2, 2)
    latent: tuple[int, int, int] = (8, 32, 32)  # latent frames, height, width

    @property
    def tokens(self) -> int:
        return math.prod(n // p for n, p in zip(self.latent, self.patch, strict=True))

    @property
    def model_key(self) -> str:
        cut = "" if self.layers == 30 else f"-{self.layers}layers"
        return f"wan2.1-1.3b-geometry{cut}-random-weights"


@dataclass(frozen=True)
class VideoBenchConfig:
    workload: str = "embedded"
    specs: tuple[str, ...] = ()
    reps: int = 3
    steps: int = 20
    clips: int = 4
    threads: int = 1
    model: str | None = None  # embedded: a folder written by `train video-dit` (default: the shipped model)
    frames: int = 0  # embedded: frames per clip (0: the model's own)
    guidance: float = 1.0  # embedded: classifier-free guidance scale of the sampler (1: none)
    geometry: WanGeometry = field(default_factory=WanGeometry)


@dataclass
class VideoRow:
    """One measurement: one configuration, one clip (embedded) or latent (Wan geometry), one repetition."""

    label: str
    workload: str
    rep: int
    clip: int
    tokens: int
    steps: int
    e2e_s: float
    attn_s: float
    density: float
    calls: int = 0  # self-attention calls of the run (every step, every layer)
    sparse_calls: int = 0  # those that computed part of the pairs (density < 1): past warm-up and dense layers
    sparse_attn_s: float = 0.0  # their seconds
    sparse_density: float = 1.0  # their mean density
    psnr: float | None = None
    ssim: float | None = None
    gate_color: bool | None = None
    gate_motion: bool | None = None
    prompt: str | None = None
    seed: int | None = None


def expand_specs(methods: str, budgets: str) -> list[str]:
    """The configurations: each spec of ``methods`` (comma-separated, a spec's own brackets kept together) as given,
    or at each of ``budgets`` when its method takes a ``:value`` and the spec gives none. ``full`` is always first."""
    from ..spec import parse_dit_spec, split_specs

    out = ["full"]
    values = [b.strip() for b in budgets.split(",") if b.strip()]
    for text in split_specs(methods):
        method = parse_dit_spec(text)
        knob = type(method).budget_param
        if knob is not None and ":" not in text.split("]")[-1] and values:
            for v in values:
                out.append(parse_dit_spec(f"{text}:{v}").label())
        else:
            out.append(method.label())
    seen: list[str] = []
    for label in out:
        if label not in seen:
            seen.append(label)
    return seen


def build_wan(geometry: WanGeometry, seed: int = 0) -> Any:
    """A ``WanTransformer3DModel`` of the geometry with random weights (speed only)."""
    import torch

    from ..adapters.diffusion import require_diffusers

    diffusers = require_diffusers()
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=geometry.patch,
        num_attention_heads=geometry.heads,
        attention_head_dim=geometry.head_dim,
        in_channels=geometry.channels,
        out_channels=geometry.channels,
        text_dim=geometry.text_dim,
        freq_dim=geometry.freq_dim,
        ffn_dim=geometry.ffn,
        num_layers=geometry.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    return model.eval()


def _calls(sieve: Any) -> dict[str, Any]:
    """The run's call counts, and the seconds and mean density of its sparse calls (density < 1)."""
    records = sieve.stats.records
    sparse = [r for r in records if r.density < 1.0]
    return {
        "calls": len(records),
        "sparse_calls": len(sparse),
        "sparse_attn_s": sum(r.seconds for r in sparse),
        "sparse_density": statistics.fmean(r.density for r in sparse) if sparse else 1.0,
    }


class _Workload:
    """What one configuration runs once: ``run(spec, clip, rep)`` → a row (and the clip's frames, embedded only)."""

    tokens: int
    clips: int

    def run(self, spec: str, clip: int, rep: int, steps: int) -> tuple[VideoRow, Any]:  # pragma: no cover
        raise NotImplementedError


class _Embedded(_Workload):
    def __init__(self, cfg: VideoBenchConfig) -> None:
        from ..adapters.diffusion.embedded import clip_frames, load_embedded
        from ..data.clips import make_clip, split_seed

        self.model = load_embedded(cfg.model)
        mc = self.model.cfg
        self.frames = clip_frames(self.model, cfg.frames or None, "--frames")  # refused before any work
        self.tokens = mc.tokens // mc.frames * self.frames
        self.clips = cfg.clips
        self.guidance = cfg.guidance
        self.prompts = []
        for i in range(cfg.clips):
            seed = split_seed("test", i)
            self.prompts.append((make_clip(seed, self.frames, mc.size).prompt, seed))

    def run(self, spec: str, clip: int, rep: int, steps: int) -> tuple[VideoRow, Any]:
        from ..adapters.diffusion import sparsify
        from ..adapters.diffusion.embedded import sample

        prompt, seed = self.prompts[clip]
        with sparsify(self.model.transformer, spec, num_steps=steps) as sieve:
            t0 = time.perf_counter()
            video = sample(self.model, [prompt], [seed], steps=steps, sieve=sieve, frames=self.frames,
                           guidance=self.guidance)[0].numpy()  # fmt: skip
            e2e = time.perf_counter() - t0
        row = VideoRow(spec, "embedded", rep, clip, self.tokens, steps, e2e, sieve.stats.attention_seconds(),
                       sieve.stats.density(), prompt=prompt, seed=seed, **_calls(sieve))  # fmt: skip
        return row, video


class _Wan(_Workload):
    def __init__(self, cfg: VideoBenchConfig) -> None:
        import torch

        g = cfg.geometry
        if cfg.model is not None:  # a user's Wan transformer (a diffusers folder): its weights and geometry
            from ..adapters.diffusion import load_transformer

            self.model = load_transformer(cfg.model)
            c = self.model.config
            if type(self.model).__name__ != "WanTransformer3DModel":
                raise ConfigError(f"--video wan2.1-1.3b --video-model needs a Wan transformer; {cfg.model} holds "
                                  f"{type(self.model).__name__}.")  # fmt: skip
            g = WanGeometry(layers=c.num_layers, heads=c.num_attention_heads, head_dim=c.attention_head_dim,
                            ffn=c.ffn_dim, channels=c.in_channels, text_dim=c.text_dim, freq_dim=c.freq_dim,
                            patch=tuple(c.patch_size), latent=g.latent)  # fmt: skip
        else:
            self.model = build_wan(g)
        self.geometry = g
        self.tokens = g.tokens
        self.clips = 1
        gen = torch.Generator().manual_seed(0)
        self.latent = torch.randn(1, g.channels, *g.latent, generator=gen)
        self.text = torch.randn(1, g.text_tokens, g.text_dim, generator=gen)

    def run(self, spec: str, clip: int, rep: int, steps: int) -> tuple[VideoRow, Any]:
        import torch

        from ..adapters.diffusion import sparsify

        with sparsify(self.model, spec, num_steps=steps) as sieve, torch.no_grad():
            t0 = time.perf_counter()
            for i in range(steps):
                t = torch.tensor([1000.0 * (1 - i / steps)])
                self.model(self.latent, t, self.text, return_dict=False)
            e2e = time.perf_counter() - t0
        row = VideoRow(spec, "wan2.1-1.3b", rep, clip, self.tokens, steps, e2e, sieve.stats.attention_seconds(),
                       sieve.stats.density(), **_calls(sieve))  # fmt: skip
        return row, None


def run_video_bench(
    cfg: VideoBenchConfig,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    write: Callable[[VideoRow], None] | None = None,
    skip: Callable[[str, int, int], bool] | None = None,
) -> list[VideoRow]:
    """Every configuration of ``cfg.specs`` (``full`` first) on every clip, ``cfg.reps`` times interleaved; fidelity
    (PSNR, SSIM against the dense clip of the same seed) and the gate on the embedded model. ``write(row)``: called
    as each row is measured; ``skip(spec, clip, rep)``: a measurement not to make (already stored)."""
    import torch

    from ..data.clips import gate, psnr, ssim

    if cfg.workload not in WORKLOADS:
        raise ConfigError(f"Unknown video workload {cfg.workload!r}; workloads: {', '.join(WORKLOADS)}.")
    if cfg.reps < 1 or cfg.steps < 1 or cfg.clips < 1:
        raise ConfigError("--reps, --steps and --clips must be ≥ 1.")
    torch.set_num_threads(cfg.threads)
    specs = list(cfg.specs) or ["full"]
    if specs[0] != "full":
        specs = ["full", *[s for s in specs if s != "full"]]
    work: _Workload = _Embedded(cfg) if cfg.workload == "embedded" else _Wan(cfg)
    for spec in specs:  # warm-up: FlexAttention compiles for the shapes; untimed
        work.run(spec, 0, -1, min(cfg.steps, 2))
    dense: dict[int, Any] = {}
    rows: list[VideoRow] = []
    total = cfg.reps * work.clips * len(specs)
    done = 0
    for rep in range(cfg.reps):
        order = specs[rep % len(specs) :] + specs[: rep % len(specs)]
        for clip in range(work.clips):
            if cfg.workload == "embedded" and clip not in dense:
                dense[clip] = work.run("full", clip, -1, cfg.steps)[1]  # the reference clip (deterministic)
            for spec in order:
                done += 1
                if skip is not None and skip(spec, clip, rep):
                    continue
                row, video = work.run(spec, clip, rep, cfg.steps)
                if video is not None:
                    ref = dense[clip]
                    row.psnr, row.ssim = psnr(ref, video), ssim(ref, video)
                    result = gate(video, row.prompt or "")
                    row.gate_color, row.gate_motion = result.color_ok, result.motion_ok
                rows.append(row)
                if write is not None:
                    write(row)
                if progress is not None:
                    progress(done, total, spec)
    return rows


# ---------------------------------------------------------------------------------------------- summaries
def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summarize(rows: Sequence[VideoRow]) -> list[dict[str, Any]]:
    """Per workload and configuration: medians of the times, the speed-ups over ``full`` (ratios of medians), the
    FLOPs ideal ``1 / density`` and the achieved fraction — over the whole run (dense warm-up steps and layers
    included) and per sparse call (a call of density < 1 against one dense call) — mean PSNR / SSIM (inf when every
    clip is identical to dense) and the gate's pass rates."""
    out = []
    for workload in sorted({r.workload for r in rows}):
        wrows = [r for r in rows if r.workload == workload]
        base = [r for r in wrows if r.label == "full"]
        dense_e2e = _median([r.e2e_s for r in base])
        dense_attn = _median([r.attn_s for r in base])
        dense_call = _median([r.attn_s / r.calls for r in base if r.calls])  # one dense self-attention call
        for label in dict.fromkeys(r.label for r in wrows):
            rs = [r for r in wrows if r.label == label]
            e2e, attn = _median([r.e2e_s for r in rs]), _median([r.attn_s for r in rs])
            density = statistics.fmean(r.density for r in rs)
            attn_speedup = dense_attn / attn if attn > 0 else float("nan")
            ideal = 1.0 / density if density > 0 else float("nan")
            psnrs = [r.psnr for r in rs if r.psnr is not None]
            ssims = [r.ssim for r in rs if r.ssim is not None]
            gates = [r for r in rs if r.gate_color is not None]
            sparse_call = _median([r.sparse_attn_s / r.sparse_calls for r in rs if r.sparse_calls])
            sparse_density = statistics.fmean(r.sparse_density for r in rs)
            sparse_speedup = dense_call / sparse_call if sparse_call > 0 else float("nan")
            out.append(
                {
                    "workload": workload,
                    "label": label,
                    "tokens": rs[0].tokens,
                    "steps": rs[0].steps,
                    "n": len(rs),
                    "e2e_s": e2e,
                    "attn_s": attn,
                    "density": density,
                    "attn_speedup": attn_speedup,
                    "e2e_speedup": dense_e2e / e2e if e2e > 0 else float("nan"),
                    "flops_ideal": ideal,
                    "ideal_fraction": attn_speedup / ideal if ideal == ideal and ideal > 0 else float("nan"),
                    "sparse_calls": sum(r.sparse_calls for r in rs) / len(rs),
                    "calls": sum(r.calls for r in rs) / len(rs),
                    "sparse_density": sparse_density,
                    "sparse_speedup": sparse_speedup,
                    "sparse_ideal_fraction": sparse_speedup * sparse_density,
                    "psnr": statistics.fmean(psnrs) if psnrs and all(math.isfinite(p) for p in psnrs) else
                    (float("inf") if psnrs else None),
                    "ssim": statistics.fmean(ssims) if ssims else None,
                    "gate_color": sum(bool(r.gate_color) for r in gates) / len(gates) if gates else None,
                    "gate_motion": sum(bool(r.gate_motion) for r in gates) / len(gates) if gates else None,
                }
            )  # fmt: skip
    return out


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isnan(v):
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, spec)


HEADER = (
    "workload", "configuration", "tokens", "density", "attention s", "attention speed-up", "FLOPs ideal", "of ideal",
    "sparse calls", "their density", "per sparse call speed-up", "of ideal", "end-to-end s", "end-to-end speed-up",
    "PSNR dB", "SSIM", "gate colour", "gate motion",
)  # fmt: skip


def table_body(summary: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The cells of :data:`HEADER` for each summary row (the random-weight workload labelled speed only)."""
    body = []
    for s in summary:
        workload = s["workload"] + (" (random weights, speed only)" if s["workload"] != "embedded" else "")
        body.append([
            workload, f"`{s['label']}`", str(s["tokens"]), _fmt(s["density"]), _fmt(s["attn_s"], ".3f"),
            f"{_fmt(s['attn_speedup'])}×", f"{_fmt(s['flops_ideal'])}×", _fmt(s["ideal_fraction"]),
            f"{s['sparse_calls']:.0f} of {s['calls']:.0f}", _fmt(s["sparse_density"]), f"{_fmt(s['sparse_speedup'])}×",
            _fmt(s["sparse_ideal_fraction"]), _fmt(s["e2e_s"], ".2f"), f"{_fmt(s['e2e_speedup'])}×",
            _fmt(s["psnr"], ".1f"), _fmt(s["ssim"], ".3f"), _fmt(s["gate_color"], ".0%"), _fmt(s["gate_motion"], ".0%"),
        ])  # fmt: skip
    return body


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_body(summary)]
    return "\n".join(lines) + "\n"


def video_sections(rows: Sequence[dict[str, Any]]) -> list[Any]:
    """The report's section of a store's DiT rows (``bench`` rows of kind ``dit``): one table per model and number of
    denoising steps and threads, as ``tokensieve bench --video`` prints it."""
    from ..results.render import Block

    if not rows:
        return []
    blocks = [
        Block("h2", "Video diffusion transformers (tokensieve bench --video)"),
        Block("p", "Every configuration against the dense model (`full`) of the same run: attention and end-to-end "
                   "speed-ups (medians), the FLOPs ideal 1 / density over the whole run and per sparse call, and on "
                   "the embedded model PSNR / SSIM against the dense clip of the same prompt, seed and sampler and "
                   "the quality gate (docs/DIT.md)."),
    ]  # fmt: skip
    groups: dict[tuple[str, int, int], list[VideoRow]] = {}
    for r in rows:
        groups.setdefault((str(r["model"]), int(r["steps"]), int(r.get("threads") or 0)), []).append(from_store(r))
    for (model, steps, threads), grows in sorted(groups.items()):
        blocks.append(Block("h3", f"{model}: {steps} steps, {threads} thread(s)"))
        blocks.append(Block("table", header=HEADER, body=table_body(summarize(grows))))
    return blocks


# ---------------------------------------------------------------------------------------------- the store
def model_key(cfg: VideoBenchConfig) -> str:
    if cfg.workload == "embedded":
        from ..adapters.diffusion.embedded import EMBEDDED_NAME

        name = EMBEDDED_NAME + (f"-{cfg.frames}frames" if cfg.frames else "")
        name += f"-guidance{cfg.guidance:g}" if cfg.guidance != 1.0 else ""
        return name if cfg.model is None else f"{name}@{weights_tag(Path(cfg.model))}"
    if cfg.model is not None:
        return f"wan@{Path(cfg.model).resolve()}"
    return cfg.geometry.model_key


def weights_tag(path: Path) -> str:
    """A name for the embedded model's weights that any machine computes alike: the folder's (or checkpoint's) name
    and the first 10 hex digits of the SHA-256 of its weights file (a path would differ between machines, and two
    checkpoints of one run directory share it)."""
    import hashlib

    candidates = [path] if path.suffix == ".pt" else [path / "model.safetensors", path / "checkpoint.pt"]
    weights = next((f for f in candidates if f.is_file()), None)
    if weights is None:
        return path.resolve().name
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{path.resolve().name}-{digest.hexdigest()[:10]}"


def row_key(spec: str, cfg: VideoBenchConfig, clip: int, rep: int) -> str:
    from ..results.store import dit_key

    workload = {"tool": TOOL, "model": model_key(cfg), "workload": cfg.workload, "steps": cfg.steps, "clip": clip,
                "rep": rep, "threads": cfg.threads}  # fmt: skip
    if cfg.workload != "embedded":
        workload["geometry"] = asdict(cfg.geometry)
    return dit_key(spec, **workload)


def store_row(row: VideoRow, *, key: str, model: str, run_id: int, threads: int) -> dict[str, Any]:
    """A measurement as a ``bench`` row: ``prefill`` and ``label`` the DiT label, ``length`` the video tokens,
    ``steps`` the denoising steps, ``prefill_attn_s`` the attention seconds, ``extra`` the rest."""
    from .. import __version__
    from ..results.store import dit_columns

    cols = dit_columns(row.label)
    extra = {k: v for k, v in asdict(row).items() if k not in ("label", "rep", "tokens", "steps", "attn_s")}
    return {
        "key": key,
        **cols,
        "model": model,
        "version": __version__,
        "created": time.time(),
        "run_id": run_id,
        "threads": threads,
        "prefill": cols["label"],
        "length": row.tokens,
        "batch": 1,
        "rep": row.rep,
        "steps": row.steps,
        "prefill_attn_s": row.attn_s,
        "extra": extra,
    }


def from_store(r: dict[str, Any]) -> VideoRow:
    extra = json.loads(r["extra"]) if isinstance(r.get("extra"), str) else (r.get("extra") or {})
    return VideoRow(label=str(r["label"]), rep=int(r["rep"]), tokens=int(r["length"]), steps=int(r["steps"]),
                    attn_s=float(r["prefill_attn_s"]), **extra)  # fmt: skip


def cmd_bench_video(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..results.store import ResultStore, is_dit
    from ..results.threads import resolve_threads
    from .machine import describe_machine

    threads = resolve_threads(args.threads)
    from .config import DEFAULT_METHODS as TEXT_DEFAULT

    methods = DEFAULT_METHODS if args.methods == TEXT_DEFAULT else args.methods
    specs = tuple(expand_specs(methods, args.budgets or DEFAULT_BUDGETS))
    geometry = WanGeometry()
    if args.latent:
        try:
            latent = tuple(int(x) for x in args.latent.replace("x", ",").split(","))
        except ValueError:
            latent = ()
        if len(latent) != 3 or min(latent) < 1:
            raise ConfigError(
                f"--latent is three whole numbers F,H,W (latent frames, height, width), not {args.latent!r}."
            )
        geometry = WanGeometry(latent=(latent[0], latent[1], latent[2]))
    if args.video_layers:
        geometry = WanGeometry(layers=args.video_layers, latent=geometry.latent)
    if args.frames and args.video != "embedded":
        raise ConfigError("--frames sets the embedded model's clip length; at Wan geometry give --latent F,H,W.")
    guidance = 1.0 if args.guidance is None else args.guidance
    if args.guidance is not None and (args.video != "embedded" or guidance < 1.0):
        raise ConfigError("--guidance (≥ 1) is the embedded model's sampler setting; the Wan geometry runs the "
                          "transformer alone.")  # fmt: skip
    cfg = VideoBenchConfig(workload=args.video, specs=specs, reps=args.reps, steps=args.steps, clips=args.clips,
                           threads=threads, model=args.video_model, geometry=geometry,
                           frames=args.frames or 0, guidance=guidance)  # fmt: skip
    report = Path(args.report) if args.report else None
    store = ResultStore(args.store) if args.store else None
    mkey = model_key(cfg)

    def progress(done: int, total: int, label: str) -> None:
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)

    try:
        write = skip = None
        if store is not None:
            done_keys = store.keys("bench")
            run_id = store.start_run(tool=TOOL, command=" ".join(sys.argv), config=asdict(cfg), model=mkey,
                                     version=__version__, threads=threads, cells=len(specs) * cfg.reps,
                                     todo=len(specs) * cfg.reps,
                                     info={"machine": describe_machine(), "workload": cfg.workload,
                                           "speed_only": cfg.workload != "embedded"})  # fmt: skip

            def write(row: VideoRow) -> None:
                store.add("bench", store_row(row, key=row_key(row.label, cfg, row.clip, row.rep), model=mkey,
                                             run_id=run_id, threads=threads))  # fmt: skip

            def skip(spec: str, clip: int, rep: int) -> bool:
                return row_key(spec, cfg, clip, rep) in done_keys

        rows = run_video_bench(cfg, progress=progress, write=write, skip=skip)
        if store is not None:  # the summary covers every stored row of this model and workload (resumed runs too)
            stored = store.rows("bench", "model = ? AND threads = ?", (mkey, threads))
            rows = [from_store(r) for r in stored if is_dit(r)]
            rows = [r for r in rows if r.workload == cfg.workload and r.label in specs and r.steps == cfg.steps]
    finally:
        if store is not None:
            store.close()
    summary = summarize(rows)
    table = markdown_table(summary)
    print(table, end="")
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        info = {"machine": describe_machine(), "config": asdict(cfg), "model": mkey}
        (report / "video_bench.json").write_text(json.dumps({"info": info, "summary": summary}, indent=2,
                                                            default=str) + "\n")  # fmt: skip
        from ..results.plots import video_tradeoff

        drawn = video_tradeoff(summary, report / "video_bench.png", f"Video DiT sparse attention: {mkey}")
        figure = "![speed and fidelity](video_bench.png)\n\n" if drawn else ""
        (report / "video_bench.md").write_text(f"# Video DiT: sparse attention ({mkey})\n\n{figure}{table}")
    return 0


__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_METHODS",
    "VideoBenchConfig",
    "VideoRow",
    "WanGeometry",
    "add_commands",
    "build_wan",
    "cmd_bench_video",
    "expand_specs",
    "markdown_table",
    "run_video_bench",
    "summarize",
    "video_sections",
]
