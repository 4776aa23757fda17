"""The two speech networks of the DAAM depression paper (Ioannides et al., arXiv 2409.00391; code
sdsuai/depression_audio_processing), with the Gaussian block replaceable by standard multi-head self-attention or by
nothing, for comparisons at similar parameter counts.

Input of both: standardised log-mel segments, shape (B, mels, frames) — the paper's (B, 40, 120). Output: logits
(B, outputs); one output for a binary task (the paper ends in a sigmoid; here the sigmoid lives in the loss,
``BCEWithLogitsLoss``, which is the same model and numerically safer).

* :class:`DAAMAudioCNNLSTM` (the code's ``CustomMel7``): Gaussian block on the mel axis (4 heads × 24 Gaussians =
  192 parameters, c from N(0, 1)) → Conv1d (mels → 128, k = 3) → BatchNorm → ReLU → MaxPool(3) → Dropout(0.05) →
  2-layer LSTM(128) → last step → Linear. The convolution and the output layer start from the code's He-uniform
  initialisation (bound √(6 / fan-in), zero bias), the batch norm from weight 1 and bias 0. ≈ 280 k parameters.
* :class:`DAAMAudioTransformer` (the code's ``CustomAttentionTransformer``): Gaussian block (4 × 16 = 128
  parameters) → TransformerEncoder (d 120, 4 heads, 2 layers, feed-forward 2048) → the last position → Linear.
  ≈ 1.1 M parameters. The tokens are the frames: each frame's mel vector is projected to d = 120 and given a learned
  position (the paper states d = 120 = the number of frames, which would make the 40 mel bins the tokens; we take
  frames as tokens so that tokens can be *selected* — ``forward(x, keep=...)`` passes only some frames to the
  encoder). ``pool="mean"`` averages the tokens instead (this package's earlier default).

  The official code builds its encoder with PyTorch's default ``batch_first=False`` and feeds it (B, 40, 120): the
  encoder's sequence axis is then the *batch* (clips attend to the other clips of their batch) and "the last
  position" is the last mel band. That is not reproduced: here each clip is its own sequence.

``attention``: ``"daam"`` (the Gaussian block), ``"mha"`` (``nn.MultiheadAttention`` over the frames with the mel
vector as embedding, 4 heads, residual: 6.6 k parameters for 40 mels) or ``"none"``.
``time_axis``: add a second Gaussian layer on the time axis (``time_heads`` heads, by default as many as the mel
layer's, same number of Gaussians), which gives the importance of frames (the mel-axis weights are normalised within
each frame, so they rank mel bins, not frames). With H time heads the frames are split into H chunks and the weights
are normalised within each chunk, so every chunk carries the same total importance; ``time_heads=1`` normalises over
all frames, so the importance can concentrate where the speech is.

``official=False`` builds the networks as this package did before it followed the authors' code (log-space Gaussian
weights, c from exp(N(0, 1)), no dropout, PyTorch's default initialisation, mean pooling), to reproduce the earlier
results.

Token selection (:class:`DAAMAudioTransformer`): ``scorer=True`` adds a :class:`FrameScorer`, a small convolution whose
scores define a density over the frames, from which k frames are drawn by systematic sampling; ``encode(h,
key_weights=m)`` runs the encoder with a soft keep mask over the keys
(a hard 0/1 mask gives exactly the encoder on the kept frames), which is how the scorer is trained to select frames
for dropping (docs/DAAM.md, "A frame selector trained for dropping").
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .gaussian import GaussianBlock

AttentionKind = Literal["daam", "mha", "none"]
ATTENTION_KINDS: tuple[str, ...] = ("daam", "mha", "none")
Pool = Literal["last", "mean"]

__all__ = [
    "ATTENTION_KINDS",
    "DAAMAudioCNNLSTM",
    "DAAMAudioTransformer",
    "FrameScorer",
    "FrontBlock",
    "count_parameters",
    "he_uniform_",
    "inclusion_probabilities",
    "systematic_sample",
]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def he_uniform_(layer: nn.Conv1d | nn.Linear) -> None:
    """The speech code's initialisation of convolutions and linear layers: weights uniform in ±√(2 / fan-in)·√3
    (fan-in = input channels × kernel size), bias 0."""
    fan_in = layer.weight[0].numel()
    bound = math.sqrt(2.0 / fan_in) * math.sqrt(3.0)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound)
        if layer.bias is not None:
            layer.bias.zero_()


def _gaussian_options(official: bool, options: dict[str, object]) -> dict[str, object]:
    """The Gaussian layers' options: the speech code's (clamped product, c from N(0, 1)) or the earlier ones
    (log-space softmax, c from exp(N(0, 1))); explicit ``options`` win."""
    base: dict[str, object] = (
        {"stable": False, "c_init": "normal"} if official else {"stable": True, "c_init": "lognormal"}
    )
    return {**base, **options}


class FrontBlock(nn.Module):
    """The block in front of both networks: Gaussian (mel axis, optionally time axis), multi-head attention over
    frames, or identity. Input and output (B, mels, frames).

    ``forward(x, return_weights=True)`` returns (y, weights) where weights is a list with one (B, mels, frames) map
    per Gaussian layer (mel layer first), or for ``"mha"`` one (B, frames, frames) attention matrix, or ``[]``.
    """

    def __init__(
        self,
        attention: str,
        mels: int,
        heads: int,
        gaussians: int,
        time_axis: bool = False,
        time_heads: int | None = None,
        **options: object,
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
        self.kind = attention
        self.gaussian: GaussianBlock | None = None
        self.mha: nn.MultiheadAttention | None = None
        if attention == "daam":
            axes = (1, 2) if time_axis else (1,)
            hs = (heads, heads if time_heads is None else time_heads) if time_axis else (heads,)
            self.gaussian = GaussianBlock(axes, hs, gaussians, **options)
        elif attention == "mha":
            if mels % heads:
                raise ConfigError(f"multi-head attention over {mels} mel bins needs heads dividing {mels}")
            self.mha = nn.MultiheadAttention(mels, heads, batch_first=True)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        if x.dim() != 3:
            raise ConfigError(f"expected (batch, mels, frames), got shape {tuple(x.shape)}")
        ws: list[Tensor] = []
        if self.gaussian is not None:
            x, ws = self.gaussian(x, return_weights=True)
        elif self.mha is not None:
            t = x.transpose(1, 2)
            a, attn = self.mha(t, t, t, need_weights=return_weights)
            x = (t + a).transpose(1, 2)
            if attn is not None:
                ws = [attn]
        return (x, ws) if return_weights else x


class DAAMAudioCNNLSTM(nn.Module):
    """Front block → Conv1d(mels→conv, k 3, pad 1) → BN → ReLU → MaxPool(3) → Dropout → LSTM(hidden, layers) → last
    step → FC.

    Shapes: (B, mels, frames) → logits (B, outputs). Defaults: the paper's code (40 mels, 4 heads × 24 Gaussians, 128
    channels, dropout 0.05, 2 × LSTM 128, He-uniform convolution and output layer): 280 k parameters.
    ``official=False``: the earlier network (no dropout, PyTorch's initialisation, log-space Gaussian weights);
    ``dropout`` overrides the dropout either way.
    """

    def __init__(
        self,
        mels: int = 40,
        outputs: int = 1,
        *,
        attention: str = "daam",
        heads: int = 4,
        gaussians: int = 24,
        time_axis: bool = False,
        time_heads: int | None = None,
        conv_channels: int = 128,
        hidden: int = 128,
        lstm_layers: int = 2,
        official: bool = True,
        dropout: float | None = None,
        **options: object,
    ) -> None:
        super().__init__()
        opts = _gaussian_options(official, options)
        self.front = FrontBlock(attention, mels, heads, gaussians, time_axis, time_heads, **opts)
        self.conv = nn.Conv1d(mels, conv_channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm1d(conv_channels)
        self.pool = nn.MaxPool1d(3)
        self.drop = nn.Dropout(dropout if dropout is not None else 0.05 if official else 0.0)
        self.lstm = nn.LSTM(conv_channels, hidden, num_layers=lstm_layers, batch_first=True)
        self.fc = nn.Linear(hidden, outputs)
        if official:  # the code initialises the convolution, the batch norm and the output layer; the LSTM as torch
            he_uniform_(self.conv)
            he_uniform_(self.fc)
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        h, ws = self.front(x, return_weights=True)
        h = self.drop(self.pool(torch.relu(self.bn(self.conv(h)))))  # (B, C, frames // 3)
        out, _ = self.lstm(h.transpose(1, 2))
        logits = self.fc(out[:, -1])
        return (logits, ws) if return_weights else logits


def inclusion_probabilities(density: Tensor, k: int) -> Tensor:
    """Per-frame inclusion probabilities p (B, T) of a sample of k frames drawn in proportion to ``density`` (B, T,
    ≥ 0, each row with a positive sum): p_t = min(c · d_t, 1) with c chosen so that Σ_t p_t = k (a frame whose share
    of the budget would exceed one frame is kept for sure and the rest of the budget is shared by the others in
    proportion). Differentiable in ``density`` where no frame sits exactly at the cap."""
    t = density.shape[1]
    if not 1 <= k <= t:
        raise ConfigError(f"k must be in 1..{t} (the frames), got {k}")
    d = density / density.sum(dim=1, keepdim=True)
    capped = torch.zeros_like(d, dtype=torch.bool)
    p = k * d
    for _ in range(t):  # each round caps at least one more frame, or stops
        over = capped | (p >= 1)
        if bool((over == capped).all()):
            break
        capped = over
        rest = (d * ~capped).sum(dim=1, keepdim=True).clamp_min(torch.finfo(d.dtype).tiny)
        p = torch.where(capped, torch.ones_like(p), (k - capped.sum(dim=1, keepdim=True)) * d / rest)
    return p.clamp(max=1.0)


def systematic_sample(p: Tensor, k: int, offset: Tensor) -> Tensor:
    """Sorted indices (B, k) of k distinct frames by systematic sampling from inclusion probabilities p (B, T,
    each ≤ 1, rows summing to k): frame t is taken when one of the points offset + i (i = 0 … k − 1) falls in
    (P_{t−1}, P_t], P the running sum of p. ``offset`` (B,) in [0, 1): 0.5 for a deterministic choice, uniform for a
    random one. With equal p the frames are evenly spaced; a frame with p = 1 is always taken."""
    b, t = p.shape
    cum = p.cumsum(dim=1).contiguous()
    points = (offset.reshape(b, 1).to(p.dtype) + torch.arange(k, dtype=p.dtype)).contiguous()
    idx = torch.searchsorted(cum, points, right=True).clamp(max=t - 1)
    steps = torch.arange(k)
    # rounding at the interval ends may repeat a frame or step past the last one: keep the indices strictly increasing
    return (idx - steps).cummax(dim=1).values.clamp(max=t - k) + steps


class FrameScorer(nn.Module):
    """A keep score per frame from the front block's output: Conv1d(mels → hidden, k) → ReLU → Conv1d(hidden → 1,
    k), both padded to keep the length. (B, mels, frames) → scores (B, frames). 6.6 k parameters for 40 mels,
    hidden 32, k 5 — far cheaper than the encoder it saves work for.

    The scores define a **frame density** (:meth:`density`): (1 − floor) · softmax(scores) + floor / T, so at least
    ``floor`` of any budget is spread evenly over the clip, and the rest follows the scores. :meth:`select` draws k
    frames from it by systematic sampling (:func:`inclusion_probabilities`, :func:`systematic_sample`): where the
    density is high the kept frames are dense, elsewhere sparse, and a flat density gives evenly spaced frames."""

    def __init__(self, mels: int, hidden: int = 32, kernel: int = 5, floor: float = 0.3) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"the scorer's kernel must be odd and ≥ 1, got {kernel}")
        if not 0 <= floor <= 1:
            raise ConfigError(f"the density floor must be in [0, 1], got {floor}")
        self.floor = floor
        self.conv1 = nn.Conv1d(mels, hidden, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(hidden, 1, kernel, padding=kernel // 2)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv2(torch.relu(self.conv1(h)))[:, 0]

    def density(self, h: Tensor) -> Tensor:
        """The frame density (B, T), rows summing to 1, from the front block's output h (B, mels, T)."""
        s = self(h)
        return (1 - self.floor) * torch.softmax(s, dim=1) + self.floor / s.shape[1]

    def select(self, h: Tensor, k: int, offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(indices (B, k) sorted, inclusion probabilities (B, T)) of k frames drawn from :meth:`density`;
        ``offset`` (B,) as in :func:`systematic_sample`, default 0.5 (deterministic)."""
        p = inclusion_probabilities(self.density(h), k)
        off = torch.full((h.shape[0],), 0.5) if offset is None else offset
        return systematic_sample(p, k, off), p


def _masked_layer(layer: nn.TransformerEncoderLayer, x: Tensor, m: Tensor, kept: Tensor) -> Tensor:
    """One post-norm encoder layer (the layer's own parameters) whose attention weighs key j by m_j:
    a_ij = m_j·exp(l_ij) / Σ_k m_k·exp(l_ik). With m ∈ {0, 1} it is the layer on the kept tokens (the others' rows
    are computed and ignored). x (B, T, d), m (B, T), kept (B, T) bool (m > 0 in the forward pass)."""
    attn = layer.self_attn
    b, t, d = x.shape
    heads = attn.num_heads
    hd = d // heads
    qkv = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3d)
    q, k, v = (z.reshape(b, t, heads, hd).transpose(1, 2) for z in qkv.chunk(3, dim=-1))  # (B, H, T, hd) each
    logits = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, H, T, T)
    top = logits.masked_fill(~kept[:, None, None, :], float("-inf")).amax(-1, keepdim=True).detach()
    e = torch.exp((logits - top).clamp(max=30.0)) * m[:, None, None, :]  # dropped keys: m = 0 in the forward pass
    a = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    a = nn.functional.dropout(a, attn.dropout, layer.training)
    o = attn.out_proj((a @ v).transpose(1, 2).reshape(b, t, d))
    x = layer.norm1(x + layer.dropout1(o))
    ff = layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
    return layer.norm2(x + layer.dropout2(ff))


class DAAMAudioTransformer(nn.Module):
    """Front block → frames as tokens: Linear(mels→d) + learned positions → TransformerEncoder → last position (or
    mean) → FC.

    Shapes: (B, mels, frames) → logits (B, outputs). Defaults: 40 mels, 120 frames, 4 heads × 16 Gaussians, d 120,
    4 attention heads, 2 layers, feed-forward 2048: 1.1 M parameters.

    ``forward(x, keep=idx)`` passes only the frames ``idx`` (B, k) — sorted indices into the frames — to the encoder,
    each with its own position: token selection after the front block. With ``pool="last"`` the last kept frame is
    read out.

    ``pool``: ``"last"`` (the official code) or ``"mean"``; default: ``"last"``, or ``"mean"`` with
    ``official=False`` (the earlier network). ``scorer=True`` adds :attr:`scorer`, a :class:`FrameScorer`.
    """

    def __init__(
        self,
        mels: int = 40,
        outputs: int = 1,
        *,
        frames: int = 120,
        attention: str = "daam",
        heads: int = 4,
        gaussians: int = 16,
        time_axis: bool = False,
        time_heads: int | None = None,
        d_model: int = 120,
        encoder_heads: int = 4,
        layers: int = 2,
        feedforward: int = 2048,
        dropout: float = 0.1,
        official: bool = True,
        pool: Pool | None = None,
        scorer: bool = False,
        **options: object,
    ) -> None:
        super().__init__()
        pool = pool or ("last" if official else "mean")
        if pool not in ("last", "mean"):
            raise ConfigError(f"pool must be 'last' or 'mean', got {pool!r}")
        self.frames = frames
        self.pool: Pool = pool
        opts = _gaussian_options(official, options)
        self.front = FrontBlock(attention, mels, heads, gaussians, time_axis, time_heads, **opts)
        self.embed = nn.Linear(mels, d_model)
        self.position = nn.Parameter(torch.zeros(frames, d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, encoder_heads, feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d_model, outputs)
        self.scorer: FrameScorer | None = FrameScorer(mels) if scorer else None

    def tokens(self, h: Tensor, keep: Tensor | None = None) -> Tensor:
        """The encoder's input: frames of the front block's output h (B, mels, frames) embedded with their
        positions (B, T, d); ``keep`` (B, k) selects frames."""
        if h.shape[2] > self.frames:
            raise ConfigError(f"the model has positions for {self.frames} frames, got {h.shape[2]}")
        t = self.embed(h.transpose(1, 2)) + self.position[: h.shape[2]]  # (B, T, d)
        if keep is not None:
            t = torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        return t

    def encode(self, h: Tensor, keep: Tensor | None = None, key_weights: Tensor | None = None) -> Tensor:
        """Encoder and head on the front block's output h (B, mels, frames) → logits.

        ``keep`` (B, k) selects frames. ``key_weights`` (B, frames), values in [0, 1] with at least one > 0 per row,
        weighs each frame as a key in every attention layer and in the pooling (see :func:`_masked_layer`): a 0/1
        mask gives the logits of ``keep`` = its kept frames, and a soft mask passes gradients to the weights."""
        t = self.tokens(h, keep)
        if key_weights is None:
            e = self.encoder(t)
            pooled = e[:, -1] if self.pool == "last" else e.mean(dim=1)
            return self.fc(pooled)
        if keep is not None:
            raise ConfigError("give keep or key_weights, not both")
        if key_weights.shape != t.shape[:2]:
            raise ConfigError(
                f"key_weights must be (batch, frames) = {tuple(t.shape[:2])}, got {tuple(key_weights.shape)}"
            )
        kept = key_weights.detach() > 0
        if not bool(kept.any(dim=1).all()):
            raise ConfigError("every row of key_weights needs a frame with weight > 0")
        m = key_weights.to(t.dtype)
        for layer in self.encoder.layers:
            t = _masked_layer(layer, t, m, kept)
        if self.encoder.norm is not None:
            t = self.encoder.norm(t)
        if self.pool == "last":
            last = (kept * torch.arange(1, t.shape[1] + 1, device=t.device)).argmax(dim=1)  # the last kept frame
            pooled = t[torch.arange(t.shape[0], device=t.device), last]
        else:
            pooled = (m.unsqueeze(-1) * t).sum(1) / m.sum(1, keepdim=True)
        return self.fc(pooled)

    def forward(
        self, x: Tensor, return_weights: bool = False, keep: Tensor | None = None
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        h, ws = self.front(x, return_weights=True)
        logits = self.encode(h, keep)
        return (logits, ws) if return_weights else logits
