"""A prompt prefilled a chunk at a time, across scheduler steps, and stored prompt prefixes reused.

The scheduler (:mod:`tokensieve.serve.engine`) gives every step a token budget shared by the running sequences'
decode rows and the prompts being prefilled. A prompt longer than its share is prefilled in chunks, one per step: each
chunk is a segment of the step's packed forward pass (:func:`~tokensieve.serve.batching.packed_step`, with the decode
rows) and runs at its true positions over an uncompressed cache of the earlier chunks (:class:`Staged`), so every
layer sees what the whole prompt's forward pass would give it. Once the last chunk is in, the prompt is compressed
with the request's spec exactly as a one-pass prefill compresses it:

* a spec that keeps every entry and runs no decode method: the staging cache *is* the request's cache;
* any other spec whose prefill can be replayed (:meth:`tokensieve.engine.Compressor.replay_refusal`): every layer's
  chunks — queries, keys, values and the hidden states the layer read — are recorded, joined into one
  :class:`~tokensieve.engine.prefill.PrefillRecord` and replayed into a fresh cache of the spec
  (``Compressor.prefill(ids, replay=record)``): the spec's own prefill mode scores, selects and applies on the whole
  prompt's tensors, as if the model had run once.

A spec whose prefill changes the forward pass itself (sparse prefill attention, auxiliary tokens after the prompt)
cannot be staged: the scheduler prefills such a prompt in one pass (:func:`staging_refusal` says why).

The same two kinds of tensors make a prompt's prefix reusable: :class:`PrefixCache` keeps them in blocks of
``block`` tokens, keyed by a hash chain of the token ids (as vLLM's automatic prefix caching), and a prompt whose
first blocks are stored starts its staging cache from them instead of running the model over them. A block stored by
a spec that needed no queries holds keys and values only; a spec that compresses needs the queries and hidden states
too and reuses only blocks that hold them.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..cache.dense import DenseKV
from ..cache.prefill import Chunk, Fresh, PrefillMode
from ..cache.sieve_cache import SieveCache
from ..cache.storage import KVStore
from ..engine import CachedContext, Compressor
from ..engine.prefill import FULL, PrefillRecord
from .batching import Segment


def needs_record(press: Compressor) -> bool:
    """Whether a staged prefill of ``press`` records queries and hidden states (its spec compresses the prompt, runs a
    decode method that may read them, or prefills in another mode than keeping every entry); False: the staging
    cache, which keeps every entry, becomes the request's cache as it is."""
    return bool(press.method.compresses or press.decode_method is not None or press.mode != FULL)


def staging_refusal(press: Compressor) -> str | None:
    """Why a prompt of ``press`` cannot be prefilled in chunks across steps or start from stored prefix blocks (None:
    it can): its spec changes the forward pass (sparse prefill attention, auxiliary tokens after the prompt), so the
    prompt's tensors depend on the spec and a recording of them cannot be replayed into its cache."""
    return press.replay_refusal()


# --------------------------------------------------------------------------------------------- prefix blocks
@dataclass(eq=False)
class Block:
    """``len(tokens)`` consecutive prompt tokens, every layer's keys and values ``(1, H_kv, n, D)`` and, when the
    prompt was recorded, queries ``(1, H_q, n, D)`` and hidden states ``(1, n, d)``."""

    key: int
    parent: int | None
    tokens: tuple[int, ...]
    keys: list[Tensor]
    values: list[Tensor]
    queries: list[Tensor] | None
    hidden: list[Tensor | None] | None
    nbytes: int


def _nbytes(tensors: Sequence[Tensor | None] | None) -> int:
    return 0 if tensors is None else sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PrefixCache:
    """Stored prompt prefixes in blocks of ``block`` tokens, least recently used first.

    A block's key hashes its parent's key with its tokens, so one key names the whole prefix up to the block's end;
    a lookup also compares the tokens and the parent, so a hash collision is a miss, never a wrong reuse. A lookup
    touches the matched blocks from the last to the first, so a parent is always used more recently than its
    children and eviction (:meth:`evict_one`) takes leaves before the prefixes they extend. Not thread-safe: the
    scheduler thread owns it (readers take the engine's lock for :attr:`bytes`).
    """

    def __init__(self, block: int) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"prefix block size must be a whole number >= 1; got {block!r}")
        self.block = block
        self.blocks: collections.OrderedDict[int, Block] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0  # tokens reused
        self.evicted = 0

    def _chain(self, ids: Sequence[int], n_blocks: int) -> list[tuple[int, int | None, tuple[int, ...]]]:
        out: list[tuple[int, int | None, tuple[int, ...]]] = []
        parent: int | None = None
        for i in range(n_blocks):
            tokens = tuple(int(t) for t in ids[i * self.block : (i + 1) * self.block])
            key = hash((parent, tokens))
            out.append((key, parent, tokens))
            parent = key
        return out

    def match(self, ids: Sequence[int], *, queries: bool) -> list[Block]:
        """The stored blocks that begin ``ids``, at most up to its last token but one (the last token is always
        computed: its logits are the first answer token's); ``queries``: only blocks that hold queries."""
        found: list[Block] = []
        for key, parent, tokens in self._chain(ids, (len(ids) - 1) // self.block):
            b = self.blocks.get(key)
            if b is None or b.parent != parent or b.tokens != tokens or (queries and b.queries is None):
                break
            found.append(b)
        for b in reversed(found):
            self.blocks.move_to_end(b.key)
        return found

    def insert(
        self,
        ids: Sequence[int],
        keys: list[Tensor],
        values: list[Tensor],
        queries: list[Tensor] | None,
        hidden: list[Tensor | None] | None,
        *,
        limit: int,
    ) -> int:
        """Store the full blocks of a prompt whose every layer's keys/values (``(1, H_kv, T, D)``; queries and hidden
        states when recorded) are given, within ``limit`` bytes in all: least recently used blocks of other prompts
        are evicted to make room, and a block that still does not fit is not stored (nor any after it). A stored
        block without queries is replaced by one with them. Returns the bytes added."""
        added = 0
        chain = self._chain(ids, len(ids) // self.block)
        mine = {key for key, _, _ in chain}
        for i, (key, parent, tokens) in enumerate(chain):
            old = self.blocks.get(key)
            if old is not None and (old.parent != parent or old.tokens != tokens):
                break  # a hash collision: keep the stored block, store nothing after it
            if old is not None and (old.queries is not None or queries is None):
                continue
            s, e = i * self.block, (i + 1) * self.block
            ks = [k[:, :, s:e].clone() for k in keys]
            vs = [v[:, :, s:e].clone() for v in values]
            qs = None if queries is None else [q[:, :, s:e].clone() for q in queries]
            hs = None if hidden is None else [None if h is None else h[:, s:e].clone() for h in hidden]
            size = _nbytes(ks) + _nbytes(vs) + _nbytes(qs) + _nbytes(hs)
            grow = size - (old.nbytes if old is not None else 0)
            while self.bytes + grow > limit and self._evict_other(mine):
                pass
            if self.bytes + grow > limit:
                break
            self.blocks[key] = Block(key, parent, tokens, ks, vs, qs, hs, size)
            self.bytes += grow
            added += grow
        for key, _, _ in reversed(chain):  # parents more recently used than their children
            if key in self.blocks:
                self.blocks.move_to_end(key)
        return added

    def _evict_other(self, keep: set[int]) -> bool:
        """Drop the least recently used block whose key is not in ``keep``; False when there is none."""
        victim = next((key for key in self.blocks if key not in keep), None)
        if victim is None:
            return False
        self.bytes -= self.blocks.pop(victim).nbytes
        self.evicted += 1
        return True

    def evict_one(self) -> bool:
        """Drop the least recently used block; False when none is stored."""
        if not self.blocks:
            return False
        _, b = self.blocks.popitem(last=False)
        self.bytes -= b.nbytes
        self.evicted += 1
        return True

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0


# --------------------------------------------------------------------------------------------- staging
class _Recorder(PrefillMode):
    """The full cache, recording what every layer's chunks add to its keys and values: their queries and hidden
    states (the keys and values themselves are in the cache's stores) and the layer's attention settings."""

    name = "recording-chunks"

    def __init__(self) -> None:
        super().__init__(None)
        self.meta: dict[int, Chunk] = {}  # a layer's first chunk, its tensors emptied (scaling and modifiers kept)
        self.queries: dict[int, list[Tensor]] = collections.defaultdict(list)
        self.hidden: dict[int, list[Tensor | None]] = collections.defaultdict(list)

    def _record(self, c: Chunk) -> None:
        if c.layer_idx not in self.meta:
            empty = c.k.new_empty(0)
            self.meta[c.layer_idx] = replace(c, q=empty, k=empty, v=empty, hidden=None)
        self.queries[c.layer_idx].append(c.q)
        self.hidden[c.layer_idx].append(c.hidden)

    def fresh(self, c: Chunk, output: bool) -> Fresh:
        self._record(c)
        return super().fresh(c, output)

    def append(self, store: KVStore, c: Chunk) -> Tensor:
        self._record(c)
        return super().append(store, c)

    def nbytes(self) -> int:
        return sum(_nbytes(qs) for qs in self.queries.values()) + sum(_nbytes(hs) for hs in self.hidden.values())

    def clear(self) -> None:
        self.meta.clear()
        self.queries.clear()
        self.hidden.clear()


class Staged:
    """One prompt being prefilled chunk by chunk (see the module's docstring).

    Args:
        press: the request's Compressor (its spec can be staged: :func:`staging_refusal` is None).
        ids: the prompt's token ids.
        reserve: headroom for the answer in the final cache.
        prefix: stored blocks that begin the prompt (they hold queries if the spec needs them).
    """

    def __init__(self, press: Compressor, ids: Sequence[int], reserve: int, prefix: Sequence[Block] = ()) -> None:
        self.press = press
        self.ids = [int(t) for t in ids]
        self.reserve = reserve
        self.record = needs_record(press)
        n_layers = press.shape.num_layers
        self.done = sum(len(b.tokens) for b in prefix)
        self.reused = self.done
        self.logits: Tensor | None = None
        self.seconds = 0.0
        self.recorder: _Recorder | None = _Recorder() if self.record else None
        self.cache: SieveCache | None = None
        # a reused prefix's queries and hidden states per layer (recorded specs); its keys and values are in the cache
        self.prefix_parts: list[tuple[Tensor, Tensor | None]] | None = None
        self._joined: list[Chunk] | None = None
        self._headroom = 0
        if prefix:
            self.cache = self._new_cache(self.done)
            if self.record:
                self.prefix_parts = []
            for layer in range(n_layers):
                k = torch.cat([b.keys[layer] for b in prefix], dim=2)  # (1, H_kv, m, D)
                v = torch.cat([b.values[layer] for b in prefix], dim=2)
                self._seed(layer, k, v)  # copied into the layer's store
                if self.prefix_parts is not None:
                    queries = [b.queries[layer] for b in prefix if b.queries is not None]
                    hidden = [b.hidden[layer] if b.hidden is not None else None for b in prefix]
                    if len(queries) != len(prefix):
                        raise ValueError("A spec that compresses reuses only prefix blocks stored with queries.")
                    q = torch.cat(queries, dim=2)  # (1, H_q, m, D)
                    h = None if any(x is None for x in hidden) else torch.cat(hidden, dim=1)  # type: ignore[arg-type]
                    self.prefix_parts.append((q, h))

    # ------------------------------------------------------------------------------------------------ state
    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done

    @property
    def finished(self) -> bool:
        return self.done >= len(self.ids)

    def nbytes(self) -> int:
        """Bytes the staging holds now: its cache's buffers, the recorded queries and hidden states, the prefix
        parts."""
        total = 0 if self.cache is None else self.cache.allocated_bytes()
        if self.recorder is not None:
            total += self.recorder.nbytes()
        if self.prefix_parts is not None:
            total += sum(_nbytes([q, h]) for q, h in self.prefix_parts)
        if self._joined is not None:
            total += sum(_nbytes([c.q, c.hidden]) for c in self._joined)
        return total

    def _new_cache(self, first: int) -> SieveCache:
        """The staging cache, sized once: the whole prompt (plus the answer's headroom when it becomes the request's
        cache), so no chunk reallocates it; ``first``: tokens its first store holds."""
        if self.recorder is not None:
            cache = SieveCache(self.press.shape.num_layers, None, self.recorder)
            self._headroom = len(self.ids) - first
        else:
            self._headroom = len(self.ids) - first + self.reserve
            cache = self.press.new_cache(reserve=self._headroom)
        return cache

    def _seed(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Start a layer's store with a stored prefix's keys and values (at positions 0 .. m-1)."""
        assert self.cache is not None
        m = int(k.shape[2])
        positions = torch.arange(m, device=k.device)[None, None, :].expand(1, int(k.shape[1]), m)
        store = DenseKV(k, v, positions, reserve=self._headroom)
        store.identity_positions = True
        state = self.cache.layers[layer]
        state.store, state.seen = store, m
        state.seen_valid = torch.tensor([m], dtype=torch.long, device=k.device)

    # ------------------------------------------------------------------------------------------------ work
    def segment(self, tokens: int) -> Segment:
        """The next ``tokens`` prompt tokens (at most what remains, at least one) as a segment of a packed step
        (:func:`~tokensieve.serve.batching.packed_step`), over this prompt's staging cache; hand the step's logits
        for it to :meth:`absorb`."""
        n = max(1, min(int(tokens), self.remaining))
        if self.cache is None:
            self.cache = self._new_cache(n)
        s = self.done
        return Segment(self.cache, self.ids[s : s + n], list(range(s, s + n)))

    def absorb(self, segment: Segment, logits: Tensor, seconds: float = 0.0) -> None:
        """A segment from :meth:`segment` ran: its tokens are in; ``logits`` ``(1, V)`` follow its last token."""
        n = len(segment.ids)
        if self.recorder is not None and self.done == 0:  # room for the rest of the prompt, allocated once
            assert self.cache is not None
            self.cache.reserve(self.remaining - n)
        self.done += n
        self.logits = logits
        self.seconds += seconds

    def _layers(self) -> list[Chunk]:
        """Every layer's whole prompt as one chunk: the stored keys and values, the prefix's and the recorded
        queries and hidden states, joined."""
        assert self.recorder is not None
        assert self.cache is not None
        joined = []
        n = len(self.ids)
        for layer in range(self.press.shape.num_layers):
            store = self.cache.layers[layer].store
            assert isinstance(store, DenseKV)
            assert store.n == n
            qs, hs = list(self.recorder.queries[layer]), list(self.recorder.hidden[layer])
            if self.prefix_parts is not None:
                q, h = self.prefix_parts[layer]
                qs, hs = [q, *qs], [h, *hs]
            hidden = None if any(h is None for h in hs) else torch.cat(hs, dim=1)  # type: ignore[arg-type]
            joined.append(replace(self.recorder.meta[layer], q=torch.cat(qs, dim=2), k=store.keys, v=store.values,
                                  valid=None, positions=torch.arange(n)[None], seen=0, hidden=hidden))  # fmt: skip
        return joined

    def _join(self) -> list[Chunk]:
        """The whole prompt's layers (:meth:`_layers`), joined once; the recorded pieces are dropped then."""
        if self._joined is None:
            self._joined = self._layers()
            assert self.recorder is not None
            self.recorder.clear()
            self.prefix_parts = None
        return self._joined

    def tensors(self) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None, list[Tensor | None] | None]:
        """Every layer's keys, values (and, when recorded, queries and hidden states) of the whole prompt, for the
        prefix cache. Call after the last chunk and before :meth:`finish`."""
        if self.recorder is not None:
            layers = self._join()
            return [c.k for c in layers], [c.v for c in layers], [c.q for c in layers], [c.hidden for c in layers]
        assert self.cache is not None
        n = len(self.ids)
        keys, values = [], []
        for state in self.cache.layers:
            assert isinstance(state.store, DenseKV)
            keys.append(state.store.keys[:, :, :n])
            values.append(state.store.values[:, :, :n])
        return keys, values, None, None

    def finish(self) -> CachedContext:
        """The request's context once every chunk is in: the staging cache itself, or the recording replayed into
        a fresh cache of the spec (compressed as a one-pass prefill compresses)."""
        assert self.finished
        assert self.logits is not None
        assert self.cache is not None
        ids = torch.tensor([self.ids], dtype=torch.long)
        mask = torch.ones_like(ids)
        if self.recorder is None:
            self.cache.reserve(self.reserve)
            ctx = CachedContext(self.cache, mask, self.logits, self.seconds, 0.0)
        else:
            record = PrefillRecord(ids, mask, self.logits, self.seconds, self._join())
            self.cache = None
            self._joined = None
            ctx = self.press.prefill(ids, reserve=self.reserve, replay=record)
        return ctx


class Extending:
    """A question appended to a fork of a stored context a chunk per step: each chunk is a segment of a packed step
    over the fork's cache (appended and attended to as ``Compressor.extend`` appends a chunk), at the positions after
    the context. For a fork whose cache runs no decode method (a bounded decode method may evict by chunk)."""

    def __init__(self, ctx: CachedContext, ids: Sequence[int]) -> None:
        if ctx.batch != 1:
            raise ValueError("a question extends a single-sequence context")
        self.ctx = ctx
        self.ids = [int(t) for t in ids]
        self.start = int(ctx.next_positions()[0])
        self.done = 0
        self.reused = 0

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done

    @property
    def finished(self) -> bool:
        return self.done >= len(self.ids)

    def nbytes(self) -> int:
        return int(self.ctx.cache.allocated_bytes())

    def segment(self, tokens: int) -> Segment:
        n = max(1, min(int(tokens), self.remaining))
        s = self.done
        return Segment(self.ctx.cache, self.ids[s : s + n], list(range(self.start + s, self.start + s + n)))

    def absorb(self, segment: Segment, logits: Tensor, seconds: float = 0.0) -> None:
        n = len(segment.ids)
        self.done += n
        self.ctx.mask = torch.cat([self.ctx.mask, self.ctx.mask.new_ones(1, n)], dim=1)
        self.ctx.logits = logits
        self.ctx.prefill_seconds += seconds

    def finish(self) -> CachedContext:
        assert self.finished
        return self.ctx


__all__ = ["Block", "Extending", "PrefixCache", "Staged", "needs_record", "staging_refusal"]
