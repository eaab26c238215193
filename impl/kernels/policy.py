"""Which custom kernels a step runs (``KernelPolicy``), set for a block with ``use_policy``;
defaults measured per backend (docs/kernel-notes.md#policy). Read when a step is built."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from conform_mlx.impl.kernels.backend import active_backend


def early_commits(num_layers: int, row_kernels: bool) -> tuple[int, ...]:
    """The layers after which a compiled step is queued before it is whole, so the GPU starts
    early (measured: docs/kernel-notes.md#policy)."""
    if row_kernels:
        return tuple(range(3, num_layers - 2, 4))
    return tuple(layer for layer in (num_layers - 7, num_layers - 5, num_layers - 3) if layer >= 0)


@dataclass(frozen=True)
class KernelPolicy:
    fused_norm: bool = False  # add_rms_norm's kernel: slower than MLX's two ops
    norm_linear: bool = False  # batch-1 rows: residual add + RMSNorm fused into q/k/v, gate/up
    linear_row: bool = False  # batch-1 rows: o, down and lm_head as a row kernel
    split_tokens: int = 128  # decode attention splits a sequence every this many tokens
    # into partitions, until B * n_kv_heads * parts groups reach target_groups (an H100 has
    # 132 SMs), and one KV head's context spreads over at most head_warps warps (parts x
    # the widest group): 8 partitions at TinyLlama's heads, 16 at Llama-3-8B's
    target_groups: int = 128
    head_warps: int = 128
    commits: Callable[[int, bool], tuple[int, ...]] = early_commits  # layers queued early
    # Every projection multiplies each row alone, so a row's numbers do not depend on the
    # rows beside it (batch invariance); one matmul a row.
    batch_invariant: bool = False
    # A long chunk of one sequence over a cache gathers exactly its context and runs MLX's
    # causal attention, no mask array; a compiled step is traced per context length. Off:
    # level with the mask on an H100 at TinyLlama's shape (docs/kernel-notes.md#policy).
    causal_chunks: bool = False
    # A compiled chunk over a cache pads its block tables to one of this many widths an
    # octave (1: a power of two). The gather and the masked attention run over the padded
    # width, up to 2x the context; 8 keeps that under 1.125x for 8x the traces. Unmeasured
    # on a GPU, so 1 (variant fine-chunk-buckets; docs/kernel-notes.md#engine).
    chunk_buckets: int = 1

    @classmethod
    def measured(cls, backend: str | None = None) -> KernelPolicy:
        """The default for ``backend`` (the active one): the row kernels on CUDA only."""
        cuda = (backend or active_backend()) == "cuda"
        return cls(norm_linear=cuda, linear_row=cuda)

    def but(self, **changes) -> KernelPolicy:
        return dataclasses.replace(self, **changes)


_CURRENT: ContextVar[KernelPolicy | None] = ContextVar("kernel_policy", default=None)


@functools.cache
def _measured() -> KernelPolicy:
    return KernelPolicy.measured()


def current_policy() -> KernelPolicy:
    """The policy ``use_policy`` set, else the measured default (made once)."""
    return _CURRENT.get() or _measured()


@contextlib.contextmanager
def use_policy(policy: KernelPolicy) -> Iterator[KernelPolicy]:
    token = _CURRENT.set(policy)
    try:
        yield policy
    finally:
        _CURRENT.reset(token)


# Named variants for A/B runs (tools/gpu_policy_ab.py): what was tried against the default.
VARIANTS = {
    "default": {},
    "no-early": {"commits": lambda n, rows: ()},
    "dense": {"commits": lambda n, rows: tuple(range(max(n - 8, 0), n - 1))},
    "fused-norm": {"fused_norm": True},
    "no-split": {"split_tokens": 1 << 30},
    "no-row-kernels": {"norm_linear": False, "linear_row": False},
    "batch-invariant": {"batch_invariant": True},
    "causal-chunks": {"causal_chunks": True},
    "fine-chunk-buckets": {"chunk_buckets": 8},
    "head-warps-64": {"head_warps": 64},  # 8B heads: 8 partitions, the rule before it
    "head-warps-256": {"head_warps": 256, "target_groups": 256},  # 8B heads: 32 partitions
}


def variant(name: str) -> KernelPolicy:
    return KernelPolicy.measured().but(**VARIANTS[name])
