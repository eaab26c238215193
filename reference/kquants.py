"""A plain block encoder for llama.cpp's K-quant types, written from the block layouts
in ggml's ``ggml-common.h``, so the suites can make K-quant GGUF files: gguf-py writes
none of them. Each type's bytes are checked against gguf-py's de-quantization, the
independent reader (``suites/test_kquants.py``).

The encoder picks scales by each sub-block's range, without llama.cpp's search for
the scales of least error: the files are for exactness tests, where any valid block
does, not for quality. A super-block holds 256 weights; a row's width must be a
multiple of 256.
"""

from __future__ import annotations

import numpy as np

QK = 256  # weights per super-block
# Bytes per super-block (ggml-common.h).
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q8_K": 292}


def _div(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """x / d, 0 where d is 0 (an all-zero sub-block)."""
    return np.divide(x, d, out=np.zeros_like(x, dtype=np.float32), where=d != 0)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values (..., n) -> bytes, value i at bit offset i * bits."""
    expanded = ((values[..., None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(expanded.reshape(*values.shape[:-1], -1), axis=-1, bitorder="little")


def _affine(x: np.ndarray, sub: int, qmax: int, scale_max: int):
    """Scales and mins for value = d * sc * q - dmin * m over sub-blocks of ``sub``:
    (d, dmin) float16 per super-block, (sc, m) ints per sub-block, q in [0, qmax], and
    the values they stand for."""
    xs = x.reshape(*x.shape[:-1], -1, sub)
    lo = np.minimum(xs.min(-1), 0)  # the min is subtracted, so it is never above 0
    step = (xs.max(-1) - lo) / qmax
    d = _f16(step.max(-1) / scale_max).astype(np.float32)
    dmin = _f16(-lo.min(-1) / scale_max).astype(np.float32)
    sc = np.clip(np.rint(_div(step, d[..., None])), 0, scale_max).astype(np.int32)
    m = np.clip(np.rint(_div(-lo, dmin[..., None])), 0, scale_max).astype(np.int32)
    shift = (dmin[..., None] * m)[..., None]
    q = np.clip(np.rint(_div(xs + shift, (d[..., None] * sc)[..., None])), 0, qmax)
    values = ((d[..., None] * sc)[..., None] * q - shift).reshape(x.shape)
    return d, dmin, sc, m, q.astype(np.int32).reshape(x.shape), values


def _symmetric(x: np.ndarray, sub: int, qmin: int, qmax: int, scale_max: int):
    """Scales for value = d * sc * q over sub-blocks of ``sub``, sc in
    [-scale_max - 1, scale_max], q in [qmin, qmax]: d float16 per super-block, and the
    values they stand for."""
    xs = x.reshape(*x.shape[:-1], -1, sub)
    step = np.abs(xs).max(-1) / -qmin
    d = _f16(step.max(-1) / scale_max).astype(np.float32)
    sc = np.clip(np.rint(_div(step, d[..., None])), -scale_max - 1, scale_max).astype(np.int32)
    q = np.clip(np.rint(_div(xs, (d[..., None] * sc)[..., None])), qmin, qmax)
    values = ((d[..., None] * sc)[..., None] * q).reshape(x.shape)
    return d, sc, q.astype(np.int32).reshape(x.shape), values


def k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> the 12 bytes of Q4_K / Q5_K: bytes 0-3 and 4-7 hold
    scales and mins 0-3 (low 6 bits) and the top 2 bits of 4-7; bytes 8-11 the low
    nibbles of scales and mins 4-7."""
    out = np.zeros((*sc.shape[:-1], 12), np.int32)
    out[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)
    return out.astype(np.uint8)


def _halves_of_64(q: np.ndarray, low_bits: int) -> np.ndarray:
    """Q4_K / Q5_K quants: each 64 weights share 32 bytes, the first 32 in the low
    nibbles, the next 32 in the high ones."""
    q = q.reshape(*q.shape[:-1], 4, 2, 32) & ((1 << low_bits) - 1)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*q.shape[:-3], 128).astype(np.uint8)


def _bytes(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [p.view(np.uint8).reshape(*p.shape[:-1], -1) if p.dtype != np.uint8 else p for p in parts],
        axis=-1,
    )


def _encode_blocks(x: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Super-blocks ``x`` (n, 256) float32 -> ((n, BLOCK_BYTES[qtype]) uint8, the
    float32 values those bytes stand for)."""
    if qtype == "Q8_K":
        d = np.abs(x).max(-1) / 127
        q = np.clip(np.rint(_div(x, d[:, None])), -128, 127).astype(np.int8)
        bsums = q.reshape(-1, 16, 16).astype(np.int16).sum(-1).astype(np.int16)
        d = d.astype(np.float32)
        return _bytes(d[:, None], q.view(np.uint8), bsums), d[:, None] * q
    if qtype in ("Q4_K", "Q5_K"):
        bits = 4 if qtype == "Q4_K" else 5
        d, dmin, sc, m, q, values = _affine(x, 32, (1 << bits) - 1, 63)
        head = [_f16(d)[:, None], _f16(dmin)[:, None], k4_scales(sc, m)]
        if bits == 4:
            return _bytes(*head, _halves_of_64(q, 4)), values
        # The fifth bits: weight l of sub-block j at bit j of byte l % 32.
        high = (q >> 4).reshape(-1, 8, 32)
        qh = (high << np.arange(8)[None, :, None]).sum(1).astype(np.uint8)
        return _bytes(*head, qh, _halves_of_64(q, 4)), values
    if qtype == "Q2_K":
        d, dmin, sc, m, q, values = _affine(x, 16, 3, 15)
        # Each 128 weights share 32 bytes: weight 32 * j + r at bits 2j of byte r.
        qs = (q.reshape(-1, 2, 4, 32) << (2 * np.arange(4))[None, None, :, None]).sum(2)
        scales = (sc | (m << 4)).astype(np.uint8)
        qs = qs.astype(np.uint8).reshape(-1, 64)
        return _bytes(scales, qs, _f16(d)[:, None], _f16(dmin)[:, None]), values
    if qtype == "Q3_K":
        d, sc, q, values = _symmetric(x, 16, -4, 3, 31)
        u = (q + 4).reshape(-1, 2, 4, 32)  # [0, 7]: two low bits in qs, the third in hmask
        qs = ((u & 3) << (2 * np.arange(4))[None, None, :, None]).sum(2).astype(np.uint8)
        hbit = (u >> 2) << (np.arange(8).reshape(2, 4))[None, :, :, None]
        hmask = hbit.sum((1, 2)).astype(np.uint8)
        s = sc + 32  # 6 bits: low nibbles in bytes 0-7, top two bits in bytes 8-11
        scales = np.zeros((len(x), 12), np.int32)
        scales[:, :8] = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
        for i in range(4):
            scales[:, 8:] |= ((s[:, 4 * i : 4 * i + 4] >> 4) & 3) << (2 * i)
        scales = scales.astype(np.uint8)
        return _bytes(hmask, qs.reshape(-1, 64), scales, _f16(d)[:, None]), values
    if qtype == "Q6_K":
        d, sc, q, values = _symmetric(x, 16, -32, 31, 127)
        u = (q + 32).reshape(-1, 2, 4, 32)  # per 128 weights: 4 runs of 32
        low, high = u & 0xF, u >> 4
        ql = np.concatenate(
            [low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], -1
        )
        qh = (high << (2 * np.arange(4))[None, None, :, None]).sum(2)
        return _bytes(
            ql.astype(np.uint8).reshape(-1, 128),
            qh.astype(np.uint8).reshape(-1, 64),
            sc.astype(np.int8),
            _f16(d)[:, None],
        ), values
    raise ValueError(f"no K-quant encoder for {qtype!r}; have {', '.join(BLOCK_BYTES)}")


def quantize(x: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``x`` (rows, n), n a multiple of 256 -> ((rows, n // 256 * BLOCK_BYTES)
    uint8 as a GGUF file stores a ``qtype`` tensor, the (rows, n) float32 values the
    bytes stand for: what any reader must de-quantize them to)."""
    x = np.asarray(x, np.float32)
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"no K-quant encoder for {qtype!r}; have {', '.join(BLOCK_BYTES)}")
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"{qtype} needs rows of a multiple of {QK} weights, got {x.shape}")
    blocks, values = _encode_blocks(x.reshape(-1, QK), qtype)
    return blocks.reshape(x.shape[0], -1), values.astype(np.float32).reshape(x.shape)
