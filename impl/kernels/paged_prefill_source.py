"""Builder of the paged prefill attention kernel (kernels/paged_prefill.inc describes it):
``paged_attention_ops``' contract, T new tokens a sequence already in the cache."""

from __future__ import annotations

from conform_mlx.impl.kernels.backend import Backend, kernel_source, make_kernel

SOURCE = kernel_source("paged_prefill")  # kernels/paged_prefill.inc

INPUTS = ["q", "kv_pool", "block_tables", "context_lens", "positions"]

# Sizes not in the template come from input shapes: no recompile per chunk length.
_BODY = SOURCE["body"]


def build_kernels(backend: Backend) -> object:
    """The prefill kernel object for ``backend`` (construction compiles nothing)."""
    return make_kernel(backend, "paged_prefill_attention", INPUTS, ["out"], _BODY)
