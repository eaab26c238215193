"""Find where a parity failure begins: the first activation, in execution order,
whose values depart from the reference's.

Both sides record activations under HF's module names (``impl.model`` trace,
``reference.hf`` hooks): ``embed_tokens``, then per layer ``input_layernorm``,
``self_attn``, ``post_attention_layernorm``, ``mlp`` and the layer output, then
the final ``norm``. A fault shows first where it is made and spreads downstream,
so the earliest departure names the culprit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conform_mlx.metrics import nmse

_PARTS = {
    "input_layernorm": "norm (input_layernorm)",
    "self_attn": "attention",
    "post_attention_layernorm": "norm (post_attention_layernorm)",
    "mlp": "MLP",
}


def trace_order(num_layers: int) -> list[str]:
    names = ["embed_tokens"]
    for i in range(num_layers):
        names += [f"layers.{i}.{part}" for part in _PARTS] + [f"layers.{i}"]
    return [*names, "norm"]


@dataclass(frozen=True)
class Departure:
    name: str  # e.g. "layers.0.self_attn"
    nmse: float
    first_position: int  # earliest token position whose row is off tolerance

    def describe(self) -> str:
        parts = self.name.split(".")
        if parts[0] == "layers":
            layer = f"layer {parts[1]}"
            what = _PARTS.get(parts[2], parts[2]) if len(parts) > 2 else "layer output"
            where = f"{layer}, {what}"
        else:
            where = {"embed_tokens": "embedding", "norm": "final norm"}[parts[0]]
        return (
            f"first departure from the reference: {where} ({self.name}), NMSE "
            f"{self.nmse:.3g}, from position {self.first_position}"
        )


def first_departure(
    ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], num_layers: int, limit: float
) -> Departure | None:
    """ours/ref: name -> (positions, hidden). None when every activation is in tolerance.

    Names ``ours`` did not record (an engine may trace a subset) are passed over.
    """
    for name in trace_order(num_layers):
        if name not in ours:
            continue
        a, b = ours[name], ref[name]
        total = nmse(a, b)
        if total > limit:
            per_row = [nmse(x, y) for x, y in zip(a, b)]
            first = (
                next(i for i, v in enumerate(per_row) if v > limit) if max(per_row) > limit else 0
            )
            return Departure(name, total, first)
    return None
