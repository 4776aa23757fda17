"""Which tokens SP-KV's write gate keeps, layer by layer, over a real prompt (``tokensieve train spkv-figure``).

The trained gate (the model's ``spkv`` profile) scores every KV pair of a held-out passage of the training text; the
figure is a heat strip per layer (rows) over the passage's tokens (columns): the gate's utility ``u`` averaged over
the KV heads, with the pairs that a threshold ``τ`` would drop (``u < τ`` in every head) hatched. ``τ`` comes from the
gate's calibration table for a target density (``--density``), as ``spkv[density=…]`` uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError


def gate_utilities(model: Any, ids: list[int], profile: Any = None) -> tuple[torch.Tensor, Any]:
    """``(L, T, H_kv)`` the gate's utilities of one prompt's pairs, and the gates (``profile``: an ``spkv``
    profile; default: the model's installed or shipped one)."""
    from ..adapters.models import model_shape
    from ..adapters.profiles import load_profile
    from ..engine import Compressor
    from ..methods.kv.spkv import SPKV
    from ..methods.kv.spkv_gate import gate_features
    from .spkv import _Observe

    shape = model_shape(model)
    profile = profile if profile is not None else load_profile("spkv", shape)
    if profile is None:
        raise ConfigError(
            f"No SP-KV gate for {shape.key}: train one with `tokensieve train spkv --ship` (docs/SPKV.md)."
        )
    gates = SPKV._gates(profile.content(shape))
    rows: list[torch.Tensor] = []

    def grab(ctx: Any) -> None:
        if gates.input == "hidden":  # a gate trained with --input hidden reads the layer's hidden state
            feats = ctx.hidden
        else:
            feats = gate_features(ctx.keys, ctx.values, ctx.positions, shape.rope_of(ctx.layer_idx))
        rows.append(gates.utility(ctx.layer_idx, feats)[0].float())  # (T, H)

    with torch.no_grad():
        Compressor(model, _Observe(callback=grab), 1.0).prefill(torch.tensor([ids]))
    return torch.stack(rows), gates


def gate_strip(model: Any, tok: Any, out: Path, *, tokens: int = 80, density: float = 0.25, seed: int = 0) -> Path:
    """Draw the heat strip of the first ``tokens`` tokens of the first held-out passage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .spkv import token_sequences

    if not 8 <= tokens <= 400:
        raise ConfigError(f"--tokens takes 8..400 (a readable strip); got {tokens}.")
    if not 0.0 < density < 1.0:
        raise ConfigError(f"--density takes a share in (0, 1); got {density}.")
    _, held, origin = token_sequences(tok, max(tokens, 64), seed)
    ids = held[0][:tokens]
    u, gates = gate_utilities(model, ids)  # (L, T, H)
    tau = gates.tau_for(density)
    mean = u.mean(-1).numpy()  # (L, T)
    dropped = (u < tau).all(-1).numpy()
    L, T = mean.shape
    words = [tok.decode([i]).replace("\n", "⏎").strip() or "␣" for i in ids]
    words = [w if len(w) <= 12 else w[:11] + "…" for w in words]
    source = origin.split(":/")[0]  # the package, not a path on this machine
    fig, ax = plt.subplots(figsize=(max(8.0, 0.16 * T), 0.22 * L + 1.6), constrained_layout=True)
    im = ax.imshow(mean, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ys, xs = dropped.nonzero()
    ax.scatter(xs, ys, marker="x", s=6, c="white", linewidths=0.5, label=f"dropped at τ = {tau:.2f}")
    ax.set_xticks(range(T))
    ax.set_xticklabels(words, rotation=90, fontsize=5)
    ax.set_yticks(range(0, L, 2))
    ax.set_ylabel("layer")
    ax.set_title(
        f"SP-KV write gate: utility per pair (mean over KV heads), {T} held-out tokens of {source}; "
        f"× = dropped by every head at the {density:.0%} density threshold",
        fontsize=7,
    )
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="u")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=140)
    plt.close(fig)
    return out


def cmd_spkv_figure(args: Any) -> int:
    from ..adapters.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    path = gate_strip(model, tok, Path(args.out), tokens=args.tokens, density=args.density, seed=args.seed)
    print(f"figure: {path}")
    return 0


def add_command(tsub: Any) -> None:
    from ..results.threads import whole_number

    f = tsub.add_parser("spkv-figure", help="heat strip of the SP-KV gate's utilities per layer over held-out text")
    f.add_argument("--out", default="docs/figures/spkv_gate_strip.png")
    f.add_argument("--tokens", type=whole_number(1), default=80, help="how many held-out tokens to draw")
    f.add_argument("--density", type=float, default=0.25, help="the target density whose threshold marks drops")
    f.add_argument("--model", default="smollm2-135m")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=whole_number(1), default=2)
    f.set_defaults(func=cmd_spkv_figure)
