"""The two speech networks of the DAAM depression paper (Ioannides et al., arXiv 2409.00391), with the Gaussian block
replaceable by standard multi-head self-attention or by nothing, for comparisons at similar parameter counts.

Input of both: standardised log-mel segments, shape (B, mels, frames) — the paper's (B, 40, 120). Output: logits
(B, outputs); one output for a binary task (the paper ends in a sigmoid; here the sigmoid lives in the loss,
``BCEWithLogitsLoss``, which is the same model and numerically safer).

* :class:`DAAMAudioCNNLSTM`: Gaussian block on the mel axis (4 heads × 24 Gaussians = 192 parameters) → Conv1d
  (mels → 128, k = 3) → BatchNorm → ReLU → MaxPool(3) → 2-layer LSTM(128) → last step → Linear. ≈ 280 k parameters.
* :class:`DAAMAudioTransformer`: Gaussian block (4 × 16 = 128 parameters) → TransformerEncoder (d 120, 4 heads,
  2 layers, feed-forward 2048) → mean over tokens → Linear. ≈ 1.1 M parameters. The tokens are the frames: each
  frame's mel vector is projected to d = 120 and given a learned position. (The paper states d = 120 = the number of
  frames, which would make the 40 mel bins the tokens; we take frames as tokens so that tokens can be *selected* —
  :meth:`DAAMAudioTransformer.forward` takes ``keep``, the frames to pass to the encoder.)

``attention``: ``"daam"`` (the Gaussian block), ``"mha"`` (``nn.MultiheadAttention`` over the frames with the mel
vector as embedding, 4 heads, residual: 6.6 k parameters for 40 mels) or ``"none"``.
``time_axis``: add a second Gaussian layer on the time axis (``time_heads`` heads, by default as many as the mel
layer's, same number of Gaussians), which gives the importance of frames (the mel-axis weights are normalised within
each frame, so they rank mel bins, not frames). With H time heads the frames are split into H chunks and the weights
are normalised within each chunk, so every chunk carries the same total importance; ``time_heads=1`` normalises over
all frames, so the importance can concentrate where the speech is.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .gaussian import GaussianBlock

AttentionKind = Literal["daam", "mha", "none"]
ATTENTION_KINDS: tuple[str, ...] = ("daam", "mha", "none")

__all__ = ["ATTENTION_KINDS", "DAAMAudioCNNLSTM", "DAAMAudioTransformer", "FrontBlock", "count_parameters"]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


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
    """Front block → Conv1d(mels→conv, k 3, pad 1) → BN → ReLU → MaxPool(3) → LSTM(hidden, layers) → last step → FC.

    Shapes: (B, mels, frames) → logits (B, outputs). Defaults: the paper's (40 mels, 4 heads × 24 Gaussians, 128
    channels, 2 × LSTM 128): 280 k parameters.
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
        **options: object,
    ) -> None:
        super().__init__()
        self.front = FrontBlock(attention, mels, heads, gaussians, time_axis, time_heads, **options)
        self.conv = nn.Conv1d(mels, conv_channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm1d(conv_channels)
        self.pool = nn.MaxPool1d(3)
        self.lstm = nn.LSTM(conv_channels, hidden, num_layers=lstm_layers, batch_first=True)
        self.fc = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        h, ws = self.front(x, return_weights=True)
        h = self.pool(torch.relu(self.bn(self.conv(h))))  # (B, C, frames // 3)
        out, _ = self.lstm(h.transpose(1, 2))
        logits = self.fc(out[:, -1])
        return (logits, ws) if return_weights else logits


class DAAMAudioTransformer(nn.Module):
    """Front block → frames as tokens: Linear(mels→d) + learned positions → TransformerEncoder → mean → FC.

    Shapes: (B, mels, frames) → logits (B, outputs). Defaults: 40 mels, 120 frames, 4 heads × 16 Gaussians, d 120,
    4 attention heads, 2 layers, feed-forward 2048: 1.1 M parameters.

    ``forward(x, keep=idx)`` passes only the frames ``idx`` (B, k) — sorted indices into the frames — to the encoder,
    each with its own position: token selection after the front block.
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
        **options: object,
    ) -> None:
        super().__init__()
        self.frames = frames
        self.front = FrontBlock(attention, mels, heads, gaussians, time_axis, time_heads, **options)
        self.embed = nn.Linear(mels, d_model)
        self.position = nn.Parameter(torch.zeros(frames, d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, encoder_heads, feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d_model, outputs)

    def encode(self, h: Tensor, keep: Tensor | None = None) -> Tensor:
        """Encoder and head on the front block's output h (B, mels, frames); ``keep`` (B, k) selects frames."""
        if h.shape[2] > self.frames:
            raise ConfigError(f"the model has positions for {self.frames} frames, got {h.shape[2]}")
        t = self.embed(h.transpose(1, 2)) + self.position[: h.shape[2]]  # (B, T, d)
        if keep is not None:
            t = torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        return self.fc(self.encoder(t).mean(dim=1))

    def forward(
        self, x: Tensor, return_weights: bool = False, keep: Tensor | None = None
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        h, ws = self.front(x, return_weights=True)
        logits = self.encode(h, keep)
        return (logits, ws) if return_weights else logits
