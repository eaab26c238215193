"""Llama-family decoder in MLX over a paged GQA KV cache, after HF's ``modeling_llama.py``, in
HF's parameter names (a parity failure names one tensor on both sides). Attention, the cache
write and add + RMSNorm go through ``kernels``; design notes: docs/kernel-notes.md#model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

import mlx.core as mx
import mlx.nn as nn

from conform_mlx.impl import kernels
from conform_mlx.impl.config import LlamaConfig
from conform_mlx.impl.kernels.policy import current_policy
from conform_mlx.impl.paged_cache import StepPlan


class CacheMismatchError(ValueError):
    """A KV cache whose pools do not have the shape the model's config implies."""


@runtime_checkable
class KVPools(Protocol):
    """A KV cache as the model sees it: one pool a layer, (num_blocks, block_size, 2,
    num_key_value_heads, head_dim), keys at [:, :, 0], values at [:, :, 1]."""

    kv: list[mx.array]

    def update_layer(self, layer: int, kv_pool: mx.array) -> None:
        """Install a layer's pool after the cache write (ops return new arrays)."""


@dataclass
class Step:
    """What every layer of a step shares, made once: cache, plan, RoPE, chunk context, trace."""

    cache: KVPools
    plan: StepPlan
    rope: kernels.RopeStep
    context: kernels.ContextRows | None
    trace: dict[str, mx.array] | None = None

    def record(self, name: str, rows: mx.array) -> None:
        """Keep ``rows`` (B * T, ...) in the trace as (B, T, ...) under ``name``."""
        if self.trace is not None:
            B, T = self.plan.positions.shape
            self.trace[name] = rows.reshape(B, T, -1)


# A Linear's transposed weight: state (a compiled step's input), not a parameter (underscore).
WEIGHT_T = "_weight_t"


def row_by_row(project: Callable[[mx.array], mx.array], x: mx.array) -> mx.array:
    """``project`` of each row of ``x`` alone, joined: the batch-invariant policy's matmul."""
    return mx.concatenate([project(x[i : i + 1]) for i in range(x.shape[0])], axis=0)


def row_weight(module: nn.Module | None) -> mx.array | kernels.Quantized | None:
    """What the row kernels would take as ``module``'s weight: a bias-free ``Linear`` or
    ``Embedding`` (a tied head), float or affine-quantized; None for anything else."""
    if module is None or "bias" in module:
        return None
    if type(module) in (Linear, nn.Embedding):
        return module.weight
    return kernels.Quantized.of(module)


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear``, or the row kernel for one row where it applies."""

    def __call__(self, x: mx.array) -> mx.array:
        weight = row_weight(self)
        if weight is not None and kernels.linear_row_applies(x, weight):
            return kernels.linear_row(x, weight)
        return super().__call__(x)


class Linear(nn.Linear):
    """``nn.Linear`` by its kept transposed view ``WEIGHT_T`` if any, or the row kernel."""

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        """Our ``QuantizedLinear`` where ``nn.quantize`` would make MLX's."""
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape[0] > 1 and current_policy().batch_invariant:
            return row_by_row(self, x)
        if "bias" not in self and kernels.linear_row_applies(x, self.weight):
            return kernels.linear_row(x, self.weight)
        wt = self.get(WEIGHT_T)
        if wt is None:
            return super().__call__(x)
        return x @ wt if "bias" not in self else mx.addmm(self["bias"], x, wt)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.dim_per_head
        self.scale = self.head_dim**-0.5
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_out, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.o_proj = Linear(q_out, cfg.hidden_size, bias=cfg.attention_bias)

    def fuse(self) -> bool:
        """q_proj, k_proj, v_proj -> ``qkv_proj``; False, nothing changed, where they can't."""
        return _fuse(self, "qkv_proj", ["q_proj", "k_proj", "v_proj"])

    def project_qkv(self, x: mx.array) -> mx.array:
        """q | k | v rows of ``x``: (rows, (n_heads + 2 * n_kv_heads) * head_dim)."""
        if "qkv_proj" in self:
            return self.qkv_proj(x)
        return mx.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)

    def __call__(self, qkv: mx.array, layer: int, step: Step) -> mx.array:
        """qkv: ``project_qkv`` rows (B * T, ...); writes K/V into ``layer``'s pool, attends."""
        plan, pools = step.plan, step.cache
        # q: (B, T, n_heads, head_dim), token-major; kv: (B * T, 2, n_kv_heads, head_dim).
        q, kv, kv_pool = kernels.rope_and_cache_write(
            qkv, plan.positions.shape, step.rope, pools.kv[layer]
        )
        pools.update_layer(layer, kv_pool)
        out = kernels.paged_attention(
            q,
            kv_pool,
            plan.block_tables,
            plan.context_lens,
            plan.positions,
            self.scale,
            own_kv=kv if plan.fresh else None,  # the new tokens are the whole context
            rows=step.context,
        )  # (B * T, n_heads * head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        h, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(h, f, bias=bias)
        self.up_proj = Linear(h, f, bias=bias)
        self.down_proj = Linear(f, h, bias=bias)

    def fuse(self) -> bool:
        """Replace gate_proj and up_proj by one ``gate_up_proj`` (see ``Attention.fuse``)."""
        return _fuse(self, "gate_up_proj", ["gate_proj", "up_proj"])

    def activate(self, x: mx.array) -> mx.array:
        """silu(gate_proj(x)) * up_proj(x), the down projection's input."""
        if "gate_up_proj" in self:
            return kernels.silu_mul(self.gate_up_proj(x))
        return nn.silu(self.gate_proj(x)) * self.up_proj(x)


def fuse_linears(parts: list[nn.Module]) -> Linear | QuantizedLinear | None:
    """One layer for ``parts`` (Linears on one input), outputs concatenated in order (rows
    stacked); None where they differ in type, bias or quantization."""
    first = parts[0]
    kind = type(first)
    if kind not in (Linear, QuantizedLinear) or any(type(p) is not kind for p in parts):
        return None
    names = sorted(first.parameters())
    if any(sorted(p.parameters()) != names for p in parts):  # a bias on some only
        return None
    out_dims = sum(p.weight.shape[0] for p in parts)
    in_dims = first.weight.shape[1]
    if kind is QuantizedLinear:
        quant = {k: getattr(first, k) for k in ("group_size", "bits", "mode")}
        if any({k: getattr(p, k) for k in quant} != quant for p in parts):
            return None
        in_dims = in_dims * 32 // first.bits
        fused = QuantizedLinear(in_dims, out_dims, "bias" in first, **quant)
    else:
        fused = Linear(in_dims, out_dims, bias="bias" in first)
    fused.update({n: mx.concatenate([p[n] for p in parts], axis=0) for n in names})
    return fused


def _fuse(module: nn.Module, fused_name: str, names: list[str]) -> bool:
    if fused_name in module:
        return True
    fused = fuse_linears([module[n] for n in names])
    if fused is None:
        return False
    for n in names:
        del module[n]
    setattr(module, fused_name, fused)
    return True


def fuses_norm(x: mx.array, linear: nn.Module | None, gated: bool) -> bool:
    """Whether ``kernels.norm_linear`` takes rows ``x`` into ``linear`` (``row_weight``)."""
    weight = row_weight(linear)
    return weight is not None and kernels.norm_linear_applies(x, weight, gated)


def add_norm_project(
    h: mx.array,
    pending: mx.array | None,
    norm: nn.RMSNorm,
    project: Callable[[mx.array], mx.array],
    fusable: tuple[nn.Module | None, bool],
    step: Step,
    name: str,
) -> tuple[mx.array, mx.array]:
    """(h + pending, project(norm(h + pending))). ``fusable``: (the Linear ``project`` uses,
    gated silu(gate) * up); one ``norm_linear`` launch where it applies, unless tracing."""
    linear, gated = fusable
    if step.trace is None and fuses_norm(h, linear, gated):
        return kernels.norm_linear(h, pending, norm.weight, norm.eps, row_weight(linear), gated)
    if pending is None:
        normed = norm(h)
    else:
        h, normed = kernels.add_rms_norm(h, pending, norm.weight, norm.eps)
    step.record(name, normed)
    return h, project(normed)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(
        self, h: mx.array, pending: mx.array | None, layer: int, step: Step
    ) -> tuple[mx.array, mx.array]:
        """h: residual stream (B * T, hidden); pending: the last MLP output, not yet added (None
        at layer 0). Returns (h, mlp): the output is h + mlp, added by the next norm."""
        name, attn, mlp = f"layers.{layer}", self.self_attn, self.mlp
        h, qkv = add_norm_project(
            h,
            pending,
            self.input_layernorm,
            attn.project_qkv,
            (attn.get("qkv_proj"), False),
            step,
            f"{name}.input_layernorm",
        )
        attn_out = attn(qkv, layer, step)
        step.record(f"{name}.self_attn", attn_out)
        h, act = add_norm_project(
            h,
            attn_out,
            self.post_attention_layernorm,
            mlp.activate,
            (mlp.get("gate_up_proj"), True),
            step,
            f"{name}.post_attention_layernorm",
        )
        mlp_out = mlp.down_proj(act)
        step.record(f"{name}.mlp", mlp_out)
        return h, mlp_out


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class Model(nn.Module):
    """``Model(cfg)(tokens, cache, plan)`` -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.weights_format = "unloaded"  # for reports; impl.loader.build sets it
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq = mx.array(cfg.inv_freq())  # underscore: not a loadable parameter
        self._forget_transposes()

    def _forget_transposes(self) -> None:
        # [Linear, weight its view came from] pairs, listed at first use; not a child.
        object.__setattr__(self, "_transposed", None)

    def keep_transposes(self) -> None:
        """Give every float ``Linear`` a view of its current weight, transposed (``WEIGHT_T``).
        The engine calls it before each step; callers that replace weights call it too."""
        if self._transposed is None:
            linears = [m for _, m in self.named_modules() if type(m) is Linear]
            object.__setattr__(self, "_transposed", [[m, None] for m in linears])
        made = []
        for entry in self._transposed:
            linear, weight = entry[0], entry[0]["weight"]
            if entry[1] is not weight:
                linear[WEIGHT_T] = weight.T
                entry[1] = weight
                made.append(linear[WEIGHT_T])
        if made:
            mx.eval(made)  # views: no copy

    def fuse_projections(self) -> list[str]:
        """Fuse each layer's q/k/v and gate/up (idempotent); returns the modules left unfused
        (e.g. quantized to different bits). Make ``CompiledSteps`` after it."""
        unfused = []
        for i, layer in enumerate(self.model.layers):
            for name in ("self_attn", "mlp"):
                if not layer[name].fuse():
                    unfused.append(f"model.layers.{i}.{name}")
        self._forget_transposes()  # the Linears changed
        return unfused

    def runs_row_kernels(self, rows: int) -> bool:
        """Whether a step of ``rows`` token rows runs the row kernels (judged by layer 0)."""
        if not self.model.layers:
            return False
        layer = self.model.layers[0]
        x = mx.zeros((rows, self.config.hidden_size), dtype=self.dtype)  # never evaluated
        qkv, gate_up = layer.self_attn.get("qkv_proj"), layer.mlp.get("gate_up_proj")
        return fuses_norm(x, qkv, False) or fuses_norm(x, gate_up, True)

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype: the norms' weights are floats even in a quantized model."""
        return self.model.norm.weight.dtype

    def check_cache(self, cache: KVPools) -> None:
        """CacheMismatchError unless ``cache`` has one pool per layer, all (num_blocks, block_size,
        2, num_key_value_heads, head_dim) of one float dtype; run before anything is reserved."""
        cfg = self.config
        layers, want = cfg.num_hidden_layers, (cfg.num_key_value_heads, cfg.dim_per_head)
        if len(cache.kv) != layers:
            raise CacheMismatchError(
                f"cache has {len(cache.kv)} KV pools, the model num_hidden_layers={layers}"
            )
        kinds = {(p.shape, p.dtype) for p in cache.kv}  # one set: runs before every step
        if len(kinds) > 1:
            seen = ", ".join(f"{s} {d}" for s, d in kinds)
            raise CacheMismatchError(f"cache pools differ in shape or dtype: {seen}")
        ((shape, dtype),) = kinds
        if len(shape) != 5 or shape[2] != 2:
            raise CacheMismatchError(
                f"cache pools are {shape}, not (num_blocks, block_size, 2, kv_heads, head_dim)"
            )
        if shape[3:] != want:
            raise CacheMismatchError(
                f"cache pools hold num_key_value_heads={shape[3]}, head_dim={shape[4]}; the "
                f"model has num_key_value_heads={want[0]}, head_dim={want[1]}"
            )
        if not mx.issubdtype(dtype, mx.floating):
            raise CacheMismatchError(f"cache pools hold {dtype}, not floats")

    def __call__(
        self,
        tokens: mx.array,
        cache: KVPools,
        plan: StepPlan,
        trace: dict[str, mx.array] | None = None,
        marks: dict[int, mx.array] | None = None,
    ) -> mx.array:
        """tokens: (B, T) int32. ``trace`` gets each layer's output and branches by HF-style name;
        ``marks`` ({layer: None}) gets those layers' MLP outputs, to queue the step up to there."""
        B, T = tokens.shape
        # (B * T, hidden) rows up to the logits: no flatten nodes (docs/kernel-notes.md#model)
        h = self.model.embed_tokens(tokens.reshape(-1))
        if trace is not None:
            trace["embed_tokens"] = h.reshape(B, T, -1)
        # RoPE angles, pool rows and a chunk's context: the same for every layer.
        block_size = cache.kv[0].shape[1]  # (num_blocks, block_size, ...)
        rope = kernels.rope_step(
            plan.positions,
            self._inv_freq,
            plan.blocks,
            plan.offsets,
            block_size,
            self.config.rope_attention_scale,
        )
        context = None
        if T > 1 and not plan.fresh:
            exact = plan.chunk_context if current_policy().causal_chunks else 0
            context = kernels.context_rows(
                plan.block_tables, plan.context_lens, plan.positions, block_size, h.dtype, exact
            )
        step = Step(cache, plan, rope, context, trace)
        mlp = None  # the latest MLP output, added to h by the next norm
        for i, layer in enumerate(self.model.layers):
            h, mlp = layer(h, mlp, i, step)
            if marks is not None and i in marks:
                marks[i] = mlp
            if trace is not None:
                step.record(f"layers.{i}", h + mlp)  # the fused add's rounding
        if self.config.tie_word_embeddings:
            head = self.model.embed_tokens
            project = head.as_linear
            if current_policy().batch_invariant:
                project = partial(row_by_row, project)
        else:
            head = project = self.lm_head
        _, logits = add_norm_project(h, mlp, self.model.norm, project, (head, False), step, "norm")
        return logits.reshape(B, T, -1)
