"""The DiT sieve: a DiT method run inside a diffusers transformer through its attention processors.

The one hook is diffusers' attention-processor API (``module.set_processor``): every self-attention module gets a
processor that computes the module's queries, keys and values with the module's own layers (projections, q/k norms,
rotary embedding — as the model's processor does) and hands the attention itself to the method. Calls the method runs
densely go through diffusers' own dispatch, exactly as the unmodified model. The denoising step is read from the
``timestep`` the transformer is called with (a new value is a new step, so classifier-free guidance's two calls share
one), the token grid from its input's shape and patch size.

Families: ``WanTransformer3DModel`` (self-attention ``blocks[i].attn1``; video grid ``F/p_t × H/p_h × W/p_w``) and
``SD3Transformer2DModel`` (joint attention ``transformer_blocks[i].attn`` — image and text tokens in one attention: the
method sparsifies image-to-image pairs, image queries read every text key, text queries are dense — and the image-only
``attn2`` of SD3.5's dual-attention blocks; grid ``1 × H/p × W/p``). Region-Adaptive Sampling also runs the blocks
on part of the tokens, through forward hooks on the Wan blocks (SD3: refused).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...errors import CapabilityError, ConfigError
from ...methods.dit import DiTCall, DiTMethod, VideoGrid
from ...methods.dit.ras import RegionAdaptiveSampling
from ...spec import parse_dit_spec


def dit_spec(spec: str | DiTMethod) -> DiTMethod:
    """The DiT method a spec names; a KV-cache or visual-token spec gets an error saying why it cannot apply."""
    return parse_dit_spec(spec)


def family_of(transformer: Any) -> str:
    name = type(transformer).__name__
    if name == "WanTransformer3DModel":
        return "wan"
    if name == "SD3Transformer2DModel":
        return "sd3"
    raise CapabilityError(
        f"{name} is not a diffusion transformer the DiT adapters know (WanTransformer3DModel, SD3Transformer2DModel)."
    )


@dataclass
class CallRecord:
    """What one self-attention call computed."""

    step: int
    layer: int
    density: float
    seconds: float  # wall time of the attention itself (the method's work included), not of the projections


@dataclass
class RunStats:
    records: list[CallRecord] = field(default_factory=list)

    def attention_seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def density(self) -> float:
        """Mean density over calls (every call has the same number of pairs)."""
        return sum(r.density for r in self.records) / max(len(self.records), 1)


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's rotary embedding on ``(B, N, H, D)`` (interleaved pairs, as ``WanAttnProcessor``)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class _Processor:
    """The processor the sieve sets on one self-attention module."""

    def __init__(self, sieve: DiTSieve, layer: int, original: Any) -> None:
        self.sieve = sieve
        self.layer = layer
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(self, attn: Any, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.sieve.family == "wan":
            return self.sieve._wan(self, attn, hidden_states, *args, **kwargs)
        return self.sieve._sd3(self, attn, hidden_states, *args, **kwargs)


class DiTSieve:
    """A DiT method attached to a diffusers transformer (use :func:`sparsify`)."""

    def __init__(self, transformer: Any, method: DiTMethod | str, num_steps: int | None = None) -> None:
        self.transformer = transformer
        self.method = dit_spec(method)
        self.family = family_of(transformer)
        if self.method.drops_tokens and self.family != "wan":
            raise CapabilityError(f"{self.method.name} runs the blocks on part of the tokens: Wan transformers only.")
        self.num_steps = num_steps
        self.modules: list[tuple[Any, Any]] = []
        self.hooks: list[Any] = []
        self.stats = RunStats()
        self.grid: VideoGrid | None = None
        self.step = -1
        self._last_t: float | None = None
        self.states: list[dict[str, Any]] = []
        # Region-Adaptive Sampling
        self.active: Tensor | None = None
        self._prev: Tensor | None = None
        self._starved: Tensor | None = None
        self._rotary_active: tuple[Tensor, Tensor] | None = None

    # -- attaching -------------------------------------------------------------------------------------------
    def self_attentions(self) -> list[Any]:
        t = self.transformer
        if self.family == "wan":
            return [b.attn1 for b in t.blocks]
        mods = []
        for b in t.transformer_blocks:
            mods.append(b.attn)
            if getattr(b, "attn2", None) is not None:
                mods.append(b.attn2)
        return mods

    def attach(self) -> DiTSieve:
        if self.modules:
            return self
        for i, m in enumerate(self.self_attentions()):
            self.modules.append((m, m.processor))
            m.set_processor(_Processor(self, i, m.processor))
        self.states = [{} for _ in self.modules]
        self.hooks.append(self.transformer.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        if self.method.drops_tokens:
            self.hooks.append(self.transformer.register_forward_hook(self._post_forward, with_kwargs=True))
            blocks = self.transformer.blocks
            for b in blocks:
                self.hooks.append(b.register_forward_pre_hook(self._block_pre))
            self.hooks.append(blocks[-1].register_forward_hook(self._last_block_post))
        return self

    def detach(self) -> None:
        for m, p in self.modules:
            m.set_processor(p)
        for h in self.hooks:
            h.remove()
        self.modules, self.hooks = [], []

    def __enter__(self) -> DiTSieve:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self, num_steps: int | None = None) -> None:
        """Start a new generation: step count, the methods' memories and the records start afresh."""
        if num_steps is not None:
            self.num_steps = num_steps
        self.step, self._last_t = -1, None
        self.states = [{} for _ in self.modules]
        self.stats = RunStats()
        self.active, self._prev, self._starved = None, None, None

    # -- hooks -----------------------------------------------------------------------------------------------
    def _pre_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if x is None or t is None:
            raise ConfigError("the DiT sieve reads hidden_states and timestep from the transformer's call.")
        cfg = module.config
        if self.family == "wan":
            pt, ph, pw = cfg.patch_size
            self.grid = VideoGrid(x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        else:
            p = cfg.patch_size
            self.grid = VideoGrid(1, x.shape[2] // p, x.shape[3] // p)
        tv = float(t.flatten()[0]) if isinstance(t, Tensor) else float(t)
        if tv != self._last_t:
            self.step += 1
            self._last_t = tv
        if self.num_steps is None:
            raise ConfigError("the DiT sieve needs the run's number of denoising steps: sparsify(..., num_steps=N).")
        if self.method.drops_tokens:
            self._plan_tokens(x.shape[0])

    def _plan_tokens(self, batch: int) -> None:
        method = self.method
        assert isinstance(method, RegionAdaptiveSampling)
        assert self.grid is not None
        assert self.num_steps is not None
        self.active = None
        if self._prev is not None and self._prev.shape[0] == batch and method.is_ras_step(self.step, self.num_steps):
            assert self._starved is not None
            self.active = method.select(self._prev, self._starved)

    def _block_pre(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self.active is None:
            return None
        hidden, enc, temb, rotary = args[:4]
        idx = self.active
        if hidden.shape[1] != idx.shape[1]:  # the first block: keep the active tokens
            hidden = torch.gather(hidden, 1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        cos, sin = rotary
        if self._rotary_active is None:
            g = idx[:, :, None, None].expand(-1, -1, 1, cos.shape[-1])
            self._rotary_active = (
                torch.gather(cos.expand(idx.shape[0], -1, -1, -1), 1, g),
                torch.gather(sin.expand(idx.shape[0], -1, -1, -1), 1, g),
            )
        return (hidden, enc, temb, self._rotary_active, *args[4:])

    def _last_block_post(self, module: Any, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        self._rotary_active = None
        if self.active is None or self.grid is None:
            return None
        full = out.new_zeros(out.shape[0], self.grid.tokens, out.shape[-1])
        return full.scatter(1, self.active[..., None].expand(-1, -1, out.shape[-1]), out)

    def _post_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        sample = output[0] if isinstance(output, tuple) else output.sample
        tokens = self._to_tokens(sample)  # (B, N, P)
        if self.active is not None and self._prev is not None:
            keep = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            keep.scatter_(1, self.active, True)
            tokens = torch.where(keep[..., None], tokens, self._prev)
            assert self._starved is not None
            self._starved = torch.where(keep, torch.zeros_like(self._starved), self._starved + 1)
            sample = self._from_tokens(tokens, sample.shape)
        else:
            self._starved = torch.zeros(tokens.shape[:2], device=tokens.device)
        self._prev = tokens
        if isinstance(output, tuple):
            return (sample, *output[1:])
        output.sample = sample
        return output

    def _to_tokens(self, sample: Tensor) -> Tensor:
        pt, ph, pw = self.transformer.config.patch_size
        B, C, F, H, W = sample.shape
        x = sample.reshape(B, C, F // pt, pt, H // ph, ph, W // pw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, (F // pt) * (H // ph) * (W // pw), -1)

    def _from_tokens(self, tokens: Tensor, shape: torch.Size) -> Tensor:
        pt, ph, pw = self.transformer.config.patch_size
        B, C, F, H, W = shape
        x = tokens.reshape(B, F // pt, H // ph, W // pw, C, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(shape)

    # -- the attention ---------------------------------------------------------------------------------------
    def _call(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scaling: float, **kw: Any) -> DiTCall:
        assert self.grid is not None
        assert self.num_steps is not None
        return DiTCall(
            q, k, v, scaling, self.grid, layer, len(self.modules), self.step, self.num_steps, self.states[layer], **kw
        )

    def _dense_now(self, layer: int) -> bool:
        m = self.method
        if isinstance(m, RegionAdaptiveSampling):
            return m.ratio >= 1
        if m.name == "full":
            return True
        assert self.num_steps is not None
        return self.step < m.warmup_steps(self.num_steps) or layer < _count(m.dense_layers, len(self.modules))

    def _record(self, layer: int, density: float, seconds: float) -> None:
        self.stats.records.append(CallRecord(self.step, layer, density, seconds))

    def _wan(
        self,
        proc: _Processor,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return proc.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)  # type: ignore[arg-type]
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rotary(query, *rotary_emb), _rotary(key, *rotary_emb)
        t0 = time.perf_counter()
        if self._dense_now(proc.layer):
            out = dispatch_attention_fn(
                query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=proc._attention_backend
            )
            density = 1.0
        else:
            scaling = query.shape[-1] ** -0.5
            call = self._call(
                proc.layer, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scaling,
                active=self.active,
            )  # fmt: skip
            res = self.method.attend(call)
            out, density = res.out.transpose(1, 2), res.density
        self._record(proc.layer, density, time.perf_counter() - t0)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _sd3(
        self,
        proc: _Processor,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        import torch.nn.functional as F

        if attention_mask is not None:
            return proc.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        B, N = hidden_states.shape[:2]

        def heads(x: Tensor) -> Tensor:
            return x.view(B, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        tq = tk = tv = None
        if encoder_hidden_states is not None:
            tq = heads(attn.add_q_proj(encoder_hidden_states))
            tk = heads(attn.add_k_proj(encoder_hidden_states))
            tv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                tq = attn.norm_added_q(tq)
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)
        t0 = time.perf_counter()
        if self._dense_now(proc.layer):
            qa = q if tq is None else torch.cat([q, tq], 2)
            ka = k if tk is None else torch.cat([k, tk], 2)
            va = v if tv is None else torch.cat([v, tv], 2)
            out = F.scaled_dot_product_attention(qa, ka, va, dropout_p=0.0, is_causal=False)
            density = 1.0
        else:
            call = self._call(proc.layer, q, k, v, q.shape[-1] ** -0.5, text_k=tk, text_v=tv)
            res = self.method.attend(call)
            out, density = res.out, res.density
            if tq is not None and tk is not None and tv is not None:
                text_out = F.scaled_dot_product_attention(
                    tq, torch.cat([k, tk], 2), torch.cat([v, tv], 2), dropout_p=0.0, is_causal=False
                )
                out = torch.cat([out, text_out], 2)
        self._record(proc.layer, density, time.perf_counter() - t0)
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is not None:
            out, text = out[:, :N], out[:, N:]
            if not attn.context_pre_only:
                text = attn.to_add_out(text)
            out = attn.to_out[1](attn.to_out[0](out))
            return out, text
        return attn.to_out[1](attn.to_out[0](out))


def _count(value: float, total: int) -> int:
    from ...methods.dit.base import count_of

    return count_of(value, total)


def sparsify(transformer: Any, spec: str | DiTMethod, num_steps: int | None = None) -> DiTSieve:
    """A :class:`DiTSieve` of ``spec`` on ``transformer`` (attached on ``with`` entry, detached on exit)."""
    return DiTSieve(transformer, spec, num_steps)
