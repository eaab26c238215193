"""Builder of the paged decode attention kernels (kernels/paged_decode.inc describes them):
``paged_attention_ops``' contract at T == 1; table entries past the context are never read."""

from __future__ import annotations

from conform_mlx.impl.kernels.backend import Backend, kernel_source, make_kernel

SOURCE = kernel_source("paged_decode")  # kernels/paged_decode.inc

INPUTS = ["q", "kv_pool", "block_tables", "context_lens"]

# Sizes not in the template come from input shapes, so a growing table never recompiles.
_BODY = SOURCE["body"]
_FINAL = SOURCE["final"]  # one partition: warp 0 normalises and writes the output
_PARTIAL = SOURCE["partial"]  # split-K: float32 (acc, [m, l]) of each partition
_COMBINE = SOURCE["combine"]  # merges the partitions


def build_kernels(backend: Backend) -> tuple[object, object, object]:
    """(one-partition, split-K, combine) kernel objects for ``backend``."""
    parts = ["part_acc", "part_ml"]
    return (
        make_kernel(backend, "paged_decode_attention", INPUTS, ["out"], _BODY + _FINAL),
        make_kernel(backend, "paged_decode_attention_split", INPUTS, parts, _BODY + _PARTIAL),
        make_kernel(backend, "paged_decode_attention_combine", parts, ["out"], _COMBINE),
    )
