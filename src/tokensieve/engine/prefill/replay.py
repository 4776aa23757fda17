"""Replayed: the forward pass of a prompt is the same for every method that attends densely at prefill — they differ
only in what they keep — so a full-cache prefill is recorded once (every layer's queries, keys and values:
:class:`Recording`) and replayed into the caches of several methods (:func:`replay`): each cache's own prefill mode
compresses the recorded chunks exactly as it would compress the forward pass's, without running the model. A method
that changes the forward pass (sparse prefill attention, auxiliary tokens) or a chunked prefill cannot replay one
(:meth:`tokensieve.spec.Spec.why_not` of a replayed request says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import Tensor

from ...cache.prefill import Chunk, Fresh, PrefillMode
from ...cache.sieve_cache import SieveCache


@dataclass
class PrefillRecord:
    """A full-cache prefill as every layer saw it, to be replayed by ``Compressor.prefill(..., replay=record)`` into
    the caches of several methods: the model runs once per prompt instead of once per method. Made by
    ``Compressor.record_prefill``. It holds every layer's queries, keys and values (``nbytes``)."""

    ids: Tensor  # (B, T)
    mask: Tensor  # (B, T)
    logits: Tensor  # (B, V) next-token logits after the prompt
    seconds: float  # wall time of the recording forward pass
    layers: list[Chunk] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)


class Recording(PrefillMode):
    """The full cache, recording every layer's first chunk (the prompt as the model computed it)."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__(None)
        self.layers: list[Chunk] = []

    def fresh(self, c: Chunk, output: bool) -> Fresh:
        self.layers.append(c)
        return super().fresh(c, output)


def replay(cache: SieveCache, record: PrefillRecord) -> None:
    """Store (and compress) a recorded prefill in a fresh cache, layer by layer, without running the model: what the
    cache does with a fresh prefill, except the attention output, which the recording forward pass already used.
    Each layer's tensors are copied first, so a method cannot alter the recording for the next replay."""
    for c in record.layers:
        if cache.layers[c.layer_idx].store is not None:
            raise RuntimeError(f"Layer {c.layer_idx} already holds a prefill; a replay needs a fresh cache.")
        hidden = None if c.hidden is None else c.hidden.clone()
        cache.take(replace(c, q=c.q.clone(), k=c.k.clone(), v=c.v.clone(), hidden=hidden), output=False)


__all__ = ["PrefillRecord", "Recording", "replay"]
