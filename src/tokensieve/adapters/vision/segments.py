"""The language model of every VLM family run segment by segment: layer by layer on a packed,
left-padded sequence whose visual tokens may be removed before it (stages a, b) or inside it (stage c).

Vocabulary:

* a :class:`Seq` is the language model's input for a batch: embeddings, which entries are real (left padding),
  their positions (``(P, B, T)``: ``P = 1`` for 1-D RoPE, ``P = 3`` for M-RoPE), which are prunable visual tokens
  and the grids those form per sample;
* a :class:`Segment` is a range of decoder layers that share one token layout (the layers before a stage-c pruning
  layer K hold every token, the layers from K on only the kept ones); each segment has its own validity mask and
  positions, and its layers' KV cache holds exactly its tokens;
* :class:`VisionState` is a prefilled prompt: the cache, the segments and the next-token logits; ``extend`` appends
  tokens (a follow-up turn, or one decoded token) through every segment; the library's one greedy loop
  (:func:`tokensieve.core.decoding.greedy`) decodes through it.

Position policy (``positions=``): ``"keep"`` — every kept token keeps the position it had in the unpruned sequence
(gaps where tokens were removed; for M-RoPE the 3-D (t, h, w) positions of the kept visual tokens); ``"renumber"`` —
the kept tokens of a segment are numbered 0, 1, … without gaps (1-D RoPE only: M-RoPE positions encode the grid, so
renumbering them is refused); ``"official"`` (the default) — each stage as its method's official code does
(:attr:`~tokensieve.methods.visual.base.VisualMethod.positions`: FastV keeps, the others renumber), and keep under
M-RoPE. Appended tokens continue after the segment's largest position, so with ``"keep"`` every
segment continues at the unpruned sequence's next position, with ``"renumber"`` at its own length.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from ...cache.sieve_cache import SieveCache
from ...errors import CapabilityError, ConfigError, PromptError
from ...methods.visual.base import Stage, VisualContext, VisualGroup, VisualKept
from ...spec import VisualPlan, VisualSpec
from ..hf import hf_cache, sieve_attention
from .attention import RowRequest, rows_routed

PositionPolicy = Literal["keep", "renumber", "official"]
POLICIES = ("official", "keep", "renumber")


def resolve(policy: PositionPolicy, spec: VisualSpec | None, P: int = 1) -> Literal["keep", "renumber"]:
    """The positions after ``spec``'s method prunes: ``policy`` itself, or for ``"official"`` the method's own
    (always ``"keep"`` under M-RoPE, whose positions encode the image grid)."""
    if policy == "keep" or policy == "renumber":
        return policy
    if policy != "official":
        raise ConfigError(f"positions must be one of {', '.join(POLICIES)}; got {policy!r}.")
    if spec is None or P != 1:
        return "keep"
    return spec.method.positions


# ------------------------------------------------------------------------------------------------ sequences
@dataclass
class Seq:
    """A left-padded batch at the language model's input (see the module docstring).

    ``visual`` marks the prunable visual tokens; ``groups[b]`` are the grids over sample b's prunable visual tokens
    in order; ``image[b]`` (``(T,)``, -1 for text) the image each token belongs to.
    """

    embeds: Tensor
    valid: Tensor
    pos: Tensor
    visual: Tensor
    image: Tensor
    groups: list[tuple[VisualGroup, ...]]

    @property
    def batch(self) -> int:
        return int(self.embeds.shape[0])

    def visual_index(self, b: int) -> Tensor:
        return self.visual[b].nonzero().flatten()


def renumbered(valid: Tensor, P: int) -> Tensor:
    """``(P, B, T)`` positions 0, 1, … over the real entries of each row (0 at padding)."""
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
    return pos[None].expand(P, -1, -1).clone()


def compact(seq: Seq, keep: list[Tensor], policy: PositionPolicy, groups: list[tuple[VisualGroup, ...]]) -> Seq:
    """Keep, per sample, the entries ``keep[b]`` (``(T,)`` bool) and pack them left-padded to the longest row.

    Positions follow ``policy``; ``groups`` are the new grids."""
    B, D = seq.embeds.shape[0], seq.embeds.shape[2]
    counts = [int(k.sum()) for k in keep]
    S = max(counts)
    P = int(seq.pos.shape[0])
    embeds = seq.embeds.new_zeros(B, S, D)
    valid = torch.zeros(B, S, dtype=torch.bool, device=seq.valid.device)
    pos = torch.zeros(P, B, S, dtype=seq.pos.dtype, device=seq.pos.device)
    visual = torch.zeros(B, S, dtype=torch.bool, device=seq.valid.device)
    image = torch.full((B, S), -1, dtype=torch.long, device=seq.valid.device)
    for b in range(B):
        idx = keep[b].nonzero().flatten()
        n = counts[b]
        embeds[b, S - n :] = seq.embeds[b, idx]
        valid[b, S - n :] = True
        pos[:, b, S - n :] = seq.pos[:, b, idx]
        visual[b, S - n :] = seq.visual[b, idx]
        image[b, S - n :] = seq.image[b, idx]
    if policy == "renumber":
        if P != 1:
            raise CapabilityError(
                "M-RoPE positions encode the image grid: renumbering them is not defined; use 'keep'."
            )
        pos = renumbered(valid, P)
    return Seq(embeds, valid, pos, visual, image, groups)


def unstructured(groups: tuple[VisualGroup, ...], kept_per_image: dict[int, int]) -> tuple[VisualGroup, ...]:
    """After a pruning step the kept tokens no longer form grids: one ``1 × n`` group per image."""
    out: list[VisualGroup] = []
    start = 0
    for image in sorted({g.image for g in groups}):
        n = kept_per_image.get(image, 0)
        if n:
            out.append(VisualGroup(start, start + n, 1, n, image))
            start += n
    return tuple(out)


def apply_kept(seq: Seq, kept: list[VisualKept], policy: PositionPolicy) -> Seq:
    """Apply one stage's per-sample results to ``seq``: text and separators stay, visual tokens not kept go, merged
    tokens replace their representative's state."""
    keep: list[Tensor] = []
    new_groups: list[tuple[VisualGroup, ...]] = []
    embeds = seq.embeds.clone()
    for b, k in enumerate(kept):
        vis = seq.visual_index(b)
        mask = seq.valid[b] & ~seq.visual[b]
        chosen = vis[k.index]
        mask[chosen] = True
        if k.tokens is not None:
            embeds[b, chosen] = k.tokens.to(embeds.dtype)
        keep.append(mask)
        full = all(g.size for g in seq.groups[b]) and int(k.index.numel()) == int(vis.numel()) and k.tokens is None
        if full:
            new_groups.append(seq.groups[b])
        else:
            per_image: dict[int, int] = {}
            for img in seq.image[b, chosen].tolist():
                per_image[int(img)] = per_image.get(int(img), 0) + 1
            new_groups.append(unstructured(seq.groups[b], per_image))
    return compact(replace(seq, embeds=embeds), keep, policy, new_groups)


# ------------------------------------------------------------------------------------------------- segments
@dataclass
class Segment:
    """Decoder layers ``[start, end)`` sharing one token layout: ``valid (B, S)`` and ``pos (P, B, S)`` over every
    entry their caches hold (prompt and appended)."""

    start: int
    end: int
    valid: Tensor
    pos: Tensor

    def next_positions(self) -> Tensor:
        """``(B,)`` the position the next appended token takes: one past the largest position of a real entry."""
        p = self.pos.amax(0).masked_fill(~self.valid, -1)
        return p.amax(-1) + 1


@dataclass
class VisionState:
    """A prefilled prompt: its cache, the segments of decoder layers and the next-token logits ``(B, V)``.

    ``kept`` records, per stage that ran, the per-sample results (indices into the prunable visual tokens that
    reached the stage); ``visual_tokens`` the number of visual tokens each sample had at the language model's input
    and after each stage-c pruning."""

    cache: SieveCache
    segments: list[Segment]
    logits: Tensor
    kept: dict[str, list[VisualKept]] = field(default_factory=dict)
    visual_tokens: dict[str, list[int]] = field(default_factory=dict)
    all_logits: Tensor | None = None

    def kv_bytes(self) -> int:
        """Bytes of the keys and values the state's cache stores (exact: :meth:`SieveCache.kv_bytes`)."""
        return int(self.cache.kv_bytes())


# --------------------------------------------------------------------------------------------------- engine
class TextStack:
    """What the engine needs of a family's language model: its decoder layers, embeddings, final norm, head and
    rotary embedding (``rope(hidden, pos (P, B, T)) -> (cos, sin)``)."""

    def __init__(
        self,
        layers: Sequence[torch.nn.Module],
        embed: torch.nn.Module,
        norm: torch.nn.Module,
        head: torch.nn.Module,
        rope: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
        attn_of: Callable[[torch.nn.Module], Any] = lambda layer: layer.self_attn,
    ) -> None:
        self.layers = list(layers)
        self.embed = embed
        self.norm = norm
        self.head = head
        self.rope = rope
        self.attn_of = attn_of

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def run_layers(
    stack: TextStack,
    h: Tensor,
    seg: Segment,
    n_new: int,
    cache: Any,
    lo: int,
    hi: int,
) -> Tensor:
    """Decoder layers ``[lo, hi)`` on ``h`` (the segment's last ``n_new`` entries), attending through ``cache`` (the
    transformers view of a SieveCache: its attention builds the causal mask over what each layer stores)."""
    pos_new = seg.pos[:, :, -n_new:]
    rope_arg = pos_new if pos_new.shape[0] > 1 else pos_new[0]
    cos_sin = stack.rope(h, rope_arg)
    mask = seg.valid.to(torch.long)
    for i in range(lo, hi):
        h = stack.layers[i](
            h,
            attention_mask=mask,
            position_ids=pos_new[0],
            past_key_values=cache,
            use_cache=True,
            position_embeddings=cos_sin,
        )
        if isinstance(h, tuple):
            h = h[0]
    return h


def llm_stage_layers(plan: VisualPlan, num_layers: int) -> list[int]:
    """The decoder layers K (in order) the plan's llm-stage method prunes before; checked against the model."""
    spec = plan.at(Stage.LLM)
    if spec is None:
        return []
    Ks = [int(k) for k in spec.method.layers(num_layers)]
    for K in Ks:
        if not 1 <= K < num_layers:
            raise ConfigError(
                f"{spec.label}: the language model has {num_layers} decoder layers, so K must be in "
                f"1..{num_layers - 1}; got {K}."
            )
    if any(b <= a for a, b in itertools.pairwise(Ks)):
        raise ConfigError(f"{spec.label}: its pruning layers must increase; got {Ks}.")
    return Ks


def llm_stage_layer(plan: VisualPlan, num_layers: int) -> int | None:
    """The first decoder layer the plan's llm-stage method prunes before (None: no llm stage)."""
    Ks = llm_stage_layers(plan, num_layers)
    return Ks[0] if Ks else None


def instruction_lengths(seq: Seq) -> list[int]:
    """Per sample, how many tokens follow its last image token (its instruction, the last prompt token included;
    separators such as LLaVA-NeXT's ``image_newline`` belong to the image); 0 for a sample without visual tokens.
    Left padding puts every sample's last token at the end, so these are the last entries of each row in every
    layout."""
    T = int(seq.valid.shape[1])
    out = []
    for b in range(seq.batch):
        if seq.visual_index(b).numel() == 0:
            out.append(0)
            continue
        img = (seq.image[b] >= 0).nonzero().flatten()
        out.append(T - 1 - int(img[-1]))
    return out


def prefill(
    stack: TextStack,
    seq: Seq,
    plan: VisualPlan,
    *,
    policy: PositionPolicy = "keep",
    cache: Any = None,
    seeds: Sequence[int] | None = None,
    all_logits: bool = False,
    forced: Sequence[Tensor] | None = None,
) -> VisionState:
    """Prefill ``seq`` (already pruned at stages a and b) with the plan's stage-c method, if any, at each of its
    layers K (:meth:`~tokensieve.methods.visual.base.VisualMethod.layers`).

    ``cache``: the SieveCache the language model's layers store their keys and values in (a Compressor's, to
    compose with a KV method); None: a plain one that keeps every kept token's. ``forced``: per
    sample the indices (into the visual tokens reaching the first K) to keep instead of the method's first step
    (tests and replays).

    Each step's per-sample results are recorded as ``state.kept["llm:K"]`` and the visual tokens left as
    ``state.visual_tokens["llm:K"]``; ``"llm"`` names the last step (for a one-layer method, its only one)."""
    B = seq.batch
    sieve = cache if cache is not None else SieveCache(stack.num_layers)
    kv = hf_cache(sieve)
    L = stack.num_layers
    Ks = llm_stage_layers(plan, L)
    spec = plan.at(Stage.LLM)
    state_kept: dict[str, list[VisualKept]] = {}
    counts = {"llm_input": [int(seq.visual[b].sum()) for b in range(B)]}
    request = RowRequest()
    modules = [stack.attn_of(layer) for layer in stack.layers]
    for m in modules:
        request.delegates[id(m)] = sieve_attention
    needs = type(spec.method).capabilities.signals if spec is not None else frozenset()
    q_len = instruction_lengths(seq)
    for K in Ks:
        mod = id(modules[K - 1])
        if "text_attention" in needs:
            request.rows[mod] = "last"
        if "text_rows" in needs and max(q_len, default=0) > 0:
            request.tails[mod] = max(q_len)
        if "keys" in needs:
            request.keys.add(mod)
        if "values" in needs or "anchor_value" in needs:
            request.values.add(mod)
    segments: list[Segment] = []
    memory: list[dict[str, Any]] = [{} for _ in range(B)]
    start: list[tuple[int, ...] | None] = [None] * B
    sizes: list[Tensor | None] = [None] * B
    cur = seq
    lo = 0
    with rows_routed(modules, request):
        h = seq.embeds
        for step, K in enumerate(Ks):
            assert spec is not None
            seg = Segment(lo, K, cur.valid.clone(), cur.pos.clone())
            segments.append(seg)
            n = int(h.shape[1])
            h = run_layers(stack, h, seg, n, kv, lo, K - 1)
            prev = h
            h = run_layers(stack, h, seg, n, kv, K - 1, K)
            mod = id(modules[K - 1])
            probs = request.probs.get(mod)
            tails = request.tail_probs.get(mod)
            keys = request.recorded_keys.get(mod)
            values = request.recorded_values.get(mod)
            cur = replace(cur, embeds=h)
            kept: list[VisualKept] = []
            for b in range(B):
                vis = cur.visual_index(b)
                ctx = VisualContext(tokens=h[b, vis], groups=cur.groups[b], stage=Stage.LLM, layer=K)
                if start[b] is None:
                    start[b] = tuple(ctx.images)
                q = q_len[b]
                ctx = replace(
                    ctx,
                    text_attention=None if probs is None else probs[b][:, vis],
                    text_rows=None if tails is None or q == 0 else tails[b][:, tails.shape[2] - q :, vis],
                    text_tokens=h[b, h.shape[1] - q :] if "text_tokens" in needs else None,
                    keys=None if keys is None else keys[b][:, vis],
                    values=None if values is None else values[b][:, vis],
                    anchor_value=None if values is None else values[b][:, -1],
                    previous=prev[b, vis] if "previous" in needs else None,
                    sizes=sizes[b],
                    step=step,
                    steps=len(Ks),
                    start=start[b],
                    memory=memory[b],
                    seed=int(seeds[b]) if seeds is not None else 0,
                )
                if forced is not None and step == 0:
                    k = VisualKept(torch.as_tensor(forced[b], dtype=torch.long, device=h.device))
                elif ctx.n == 0:
                    k = VisualKept(torch.zeros(0, dtype=torch.long, device=h.device))
                else:
                    k = spec.method.prune(ctx, spec.budget)
                kept.append(k)
                if k.sizes is not None:
                    sizes[b] = k.sizes
                elif sizes[b] is not None:
                    sizes[b] = sizes[b][k.index]  # type: ignore[index]
            cur = apply_kept(cur, kept, resolve(policy, spec, int(cur.pos.shape[0])))
            h = cur.embeds
            state_kept[f"llm:{K}"] = kept
            counts[f"llm:{K}"] = [int(cur.visual[b].sum()) for b in range(B)]
            lo = K
        seg = Segment(lo, L, cur.valid.clone(), cur.pos.clone())
        segments.append(seg)
        h = run_layers(stack, h, seg, int(h.shape[1]), kv, lo, L)
    if Ks:
        state_kept["llm"] = state_kept[f"llm:{Ks[-1]}"]
        counts["llm"] = counts[f"llm:{Ks[-1]}"]
    h = stack.norm(h)
    logits = stack.head(h[:, -1]).float()
    full = stack.head(h).float() if all_logits else None
    return VisionState(sieve, segments, logits, state_kept, counts, full)


def extend(
    stack: TextStack,
    state: VisionState,
    input_ids: Tensor,
    *,
    image_token_ids: Sequence[int] = (),
    all_logits: bool = False,
) -> Tensor:
    """Append ``input_ids (B, L)`` (a follow-up turn, or decoded tokens) to a prefilled state through every
    segment; returns the last logits ``(B, V)`` (``all_logits``: ``(B, L, V)``).

    Every appended token is real (no padding inside a batch's appended chunk) and takes the next positions of each
    segment (module docstring). Pruned visual tokens stay gone: a follow-up turn attends to what the prompt kept.
    Images cannot be appended (their tokens would need encoding): prefill again."""
    if input_ids.dim() != 2 or input_ids.shape[0] != state.logits.shape[0]:
        raise PromptError(
            f"extend expects input_ids of shape ({state.logits.shape[0]}, L); got {tuple(input_ids.shape)}."
        )
    for t in image_token_ids:
        if bool((input_ids == t).any()):
            raise CapabilityError("A follow-up chunk cannot contain image tokens: prefill a new prompt with the image.")
    n = int(input_ids.shape[1])
    h = stack.embed(input_ids)
    request = RowRequest()
    modules = [stack.attn_of(layer) for layer in stack.layers]
    for m in modules:
        request.delegates[id(m)] = sieve_attention
    kv = hf_cache(state.cache)
    with rows_routed(modules, request):
        for seg in state.segments:
            nxt = seg.next_positions()
            new_pos = nxt[None, :, None] + torch.arange(n, device=nxt.device)[None, None, :]
            P = int(seg.pos.shape[0])
            seg.pos = torch.cat([seg.pos, new_pos.expand(P, -1, -1).to(seg.pos.dtype)], dim=2)
            seg.valid = torch.cat([seg.valid, seg.valid.new_ones(seg.valid.shape[0], n)], dim=1)
            h = run_layers(stack, h, seg, n, kv, seg.start, seg.end)
    h = stack.norm(h)
    if all_logits:
        return stack.head(h).float()
    logits = stack.head(h[:, -1]).float()
    state.logits = logits
    return logits


def stage_b(
    seq: Seq,
    spec: VisualSpec | None,
    policy: PositionPolicy,
    seeds: Sequence[int] | None,
    cls_rows: Sequence[Tensor | None] | None = None,
) -> tuple[Seq, list[VisualKept] | None]:
    """Run the plan's projector-stage method on the language model's input embeddings; ``cls_rows[b]``: ``(H, N_b)``
    the vision encoder's CLS row at sample b's visual tokens (in order), or None."""
    if spec is None:
        return seq, None
    kept: list[VisualKept] = []
    for b in range(seq.batch):
        vis = seq.visual_index(b)
        ctx = VisualContext(
            tokens=seq.embeds[b, vis],
            groups=seq.groups[b],
            stage=Stage.PROJECTOR,
            layer=0,
            cls_attention=None if cls_rows is None else cls_rows[b],
            seed=int(seeds[b]) if seeds is not None else 0,
            memory={},
        )
        kept.append(spec.method.prune(ctx, spec.budget) if ctx.n else VisualKept(torch.zeros(0, dtype=torch.long)))
    return apply_kept(seq, kept, resolve(policy, spec, int(seq.pos.shape[0]))), kept
