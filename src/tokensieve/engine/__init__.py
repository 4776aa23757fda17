"""The engine: the public compression API on top of the library.

:class:`Compressor` builds a run from a spec once — it resolves the spec, asks :meth:`tokensieve.spec.Spec.why_not`
before any work, loads the profiles its methods need and picks how a prompt gets into the cache (a prefill mode,
:mod:`.prefill`, one file each) — then prefills (text, or a vision-language model's processor output), extends and
decodes with the one greedy loop. :class:`CachedContext` is a prefilled context.
"""

from ..core.decoding import Generation
from .compressor import Compressor, check_chunk, compress, resolve_spec
from .context import CachedContext
from .prefill import PrefillRecord
from .prefill.chunked import chunk_bounds

__all__ = [
    "CachedContext",
    "Compressor",
    "Generation",
    "PrefillRecord",
    "check_chunk",
    "chunk_bounds",
    "compress",
    "resolve_spec",
]
