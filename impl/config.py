"""Llama-family model configuration from a HuggingFace ``config.json``, in HF's field names;
derived values are properties, nothing is overwritten after parsing."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LLAMA3_FACTORS = ("factor", "low_freq_factor", "high_freq_factor")
SUPPORTED_ACTIVATIONS = ("silu", "swish")  # HF's two names for the SiLU impl's MLP runs


class ConfigError(ValueError):
    """config.json is missing, malformed, or describes a model we do not run."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``linear`` (every frequency over ``factor``: positions
    interpolated), ``llama3``, ``yarn`` (frequencies blended between the two over a band
    set by ``beta_fast`` / ``beta_slow``, cos and sin scaled by an attention factor), or
    ``default``, none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        # A factor <= 0 would make inv_freq NaN or flipped: the model would run, wrongly.
        for name in LLAMA3_FACTORS:
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(
                    f"{self.rope_type} rope scaling field {name} must be positive, got {v!r}"
                )
        if self.rope_type == "yarn" and not (self.beta_fast > 0 and self.beta_slow > 0):
            raise ConfigError(
                f"yarn rope scaling fields beta_fast and beta_slow must be positive, got "
                f"{self.beta_fast!r} and {self.beta_slow!r}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ConfigError(
                "llama3 rope scaling field original_max_position_embeddings must be "
                f"positive, got {self.original_max_position_embeddings!r}"
            )


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    model_type: str = "llama"
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not implemented (impl's MLP runs SiLU); "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        # A non-positive base makes every RoPE frequency NaN or inverted.
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        # MLX's RMSNorm refuses eps <= 0 too, but only when the model is built, unnamed.
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads} and head_dim is not given"
            )
        if self.dim_per_head % 2:
            raise ConfigError(f"head_dim={self.dim_per_head} must be even for RoPE")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def gqa_ratio(self) -> int:
        """Query heads served by each K/V head (1 = MHA, num_attention_heads = MQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies, one per rotated pair, after any scaling: float32 from the
        CPU stream's pow, bit for bit torch's (docs/kernel-notes.md#model)."""
        d = self.dim_per_head
        with mx.stream(mx.cpu):
            exponent = mx.arange(0, d, 2).astype(mx.float32) / d
            inv = np.array(1.0 / (mx.array(self.rope_theta, dtype=mx.float32) ** exponent))
        s = self.rope_scaling
        if s.rope_type == "default":
            return inv
        if s.rope_type == "linear":
            return inv / np.float32(s.factor)
        if s.rope_type == "yarn":
            return self._yarn_inv_freq(inv)
        # Llama 3: long wavelengths slowed by `factor`, short ones kept, the band interpolated.
        old_ctx = np.float32(s.original_max_position_embeddings)
        wavelen = np.float32(2 * math.pi) / inv
        smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * inv / s.factor + smooth * inv
        out = np.where(wavelen > old_ctx / s.low_freq_factor, inv / s.factor, inv)
        is_medium = (wavelen >= old_ctx / s.high_freq_factor) & (
            wavelen <= old_ctx / s.low_freq_factor
        )
        return np.where(is_medium, blended, out).astype(np.float32)

    def _yarn_inv_freq(self, extrapolated: np.ndarray) -> np.ndarray:
        """YaRN: each frequency blended between itself and itself over ``factor`` by a ramp
        over the pairs whose rotations at the original context lie between beta_slow and
        beta_fast (float32 throughout, as transformers computes it)."""
        s, d, base = self.rope_scaling, self.dim_per_head, self.rope_theta

        def pair(rotations: float) -> float:  # the pair index that turns so many times
            ctx = s.original_max_position_embeddings
            return d * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = pair(s.beta_fast), pair(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
        keep = (1 - ramp).astype(np.float32)
        interpolated = (1.0 / (np.float32(s.factor) / extrapolated)).astype(np.float32)
        return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)

    @property
    def rope_attention_scale(self) -> float:
        """What cos and sin are multiplied by: YaRN's attention factor (given, or
        0.1 * ln(factor) + 1), 1 for every other RoPE."""
        s = self.rope_scaling
        if s.rope_type != "yarn":
            return 1.0
        if s.attention_factor is not None:
            return s.attention_factor
        return 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> LlamaConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
            "max_position_embeddings",
        )
        missing = [k for k in required if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        for k in (*required, "num_key_value_heads", "head_dim"):
            v = raw.get(k)
            # Required fields may not be null; the optional ones are null when absent.
            if (v is not None or k in required) and not _positive_int(v):
                raise ConfigError(f"{source}: field {k} must be a positive integer, got {v!r}")
        hidden_act = raw.get("hidden_act", "silu")
        if not isinstance(hidden_act, str):
            raise ConfigError(f"{source}: field hidden_act must be a string, got {hidden_act!r}")
        bos = raw.get("bos_token_id")
        if bos is not None and not _token_id(bos):
            raise ConfigError(f"{source}: field bos_token_id must be a token id, got {bos!r}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(_token_id(t) for t in eos_ids):
            raise ConfigError(
                f"{source}: field eos_token_id must be a token id or a list of them, got {eos!r}"
            )
        theta, scaling = rope_fields(raw, source)
        try:
            return cls(
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=raw["num_attention_heads"],
                num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
                vocab_size=raw["vocab_size"],
                max_position_embeddings=raw["max_position_embeddings"],
                rms_norm_eps=_number(raw, "rms_norm_eps", 1e-6),
                rope_theta=theta,
                rope_scaling=scaling,
                head_dim=raw.get("head_dim"),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                bos_token_id=bos,
                eos_token_id=eos_ids,
                model_type=model_type,
                hidden_act=hidden_act,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> LlamaConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"{path}: not found (a HuggingFace model directory needs config.json)"
            )
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))


def rope_fields(raw: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    """RoPE base and scaling from ``rope_parameters`` (transformers 5) or top-level
    ``rope_theta`` + ``rope_scaling``; errors name the field as written."""
    try:
        return _rope_fields(raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _rope_fields(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError("rope_parameters / rope_scaling must be JSON objects")
    merged = {**scaling, **params}
    if "rope_theta" in merged:
        theta = _number(merged, "rope_theta", prefix=_where(params, "rope_theta"))
    else:
        theta = _number(raw, "rope_theta", 10000.0)
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope scaling type {rope_type!r} is not implemented; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type == "linear":
        if "factor" not in merged:
            raise ConfigError("linear rope scaling needs field factor")
        return theta, RopeScaling(
            "linear", _number(merged, "factor", prefix=_where(params, "factor"))
        )
    if rope_type == "yarn":
        return theta, _yarn(merged, params)
    for k in (*LLAMA3_FACTORS, "original_max_position_embeddings"):
        if k not in merged:
            raise ConfigError(f"llama3 rope scaling needs field {k}")
    old_ctx = merged["original_max_position_embeddings"]
    if not isinstance(old_ctx, int) or isinstance(old_ctx, bool):
        raise ConfigError(
            f"field {_where(params, 'original_max_position_embeddings')}"
            f"original_max_position_embeddings must be an integer, got {old_ctx!r}"
        )
    return theta, RopeScaling(
        rope_type=rope_type,
        **{k: _number(merged, k, prefix=_where(params, k)) for k in LLAMA3_FACTORS},
        original_max_position_embeddings=old_ctx,
    )


def _yarn(merged: dict[str, Any], params: dict[str, Any]) -> RopeScaling:
    """YaRN's fields as transformers reads them (beta_fast 32 and beta_slow 1 by default,
    truncate true); DeepSeek's mscale / mscale_all_dim are refused by name."""
    for k in ("factor", "original_max_position_embeddings"):
        if merged.get(k) is None:
            raise ConfigError(f"yarn rope scaling needs field {k}")
    for k in ("mscale", "mscale_all_dim"):
        if merged.get(k):
            raise ConfigError(f"yarn rope scaling field {k} is not implemented")
    old_ctx = merged["original_max_position_embeddings"]
    if not isinstance(old_ctx, int) or isinstance(old_ctx, bool) or old_ctx <= 0:
        raise ConfigError(
            f"field {_where(params, 'original_max_position_embeddings')}"
            f"original_max_position_embeddings must be a positive integer, got {old_ctx!r}"
        )
    fields = {
        k: _number(merged, k, prefix=_where(params, k))
        for k in ("factor", "beta_fast", "beta_slow", "attention_factor")
        if merged.get(k) is not None
    }
    return RopeScaling(
        "yarn",
        original_max_position_embeddings=old_ctx,
        truncate=bool(merged.get("truncate", True)),
        **fields,
    )


def _where(params: dict[str, Any], key: str) -> str:
    """The dotted prefix of the dict ``key`` was read from (rope_parameters wins)."""
    return "rope_parameters." if key in params else "rope_scaling."


def _number(raw: dict[str, Any], key: str, default: float | None = None, prefix: str = "") -> float:
    """A JSON number as float; ConfigError for null, a string or a bool."""
    v = raw.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ConfigError(f"field {prefix}{key} must be a number, got {v!r}")
    return float(v)


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _token_id(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
