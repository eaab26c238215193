"""The RoPE base must come from config.json whichever layout holds it.

transformers 5 writes ``rope_parameters: {rope_type, rope_theta}``; older files have a
top-level ``rope_theta``. An engine that reads only the old field runs with the
default base 10000. The error has a signature: position 0 is rotated by angle 0
whatever the base, so it agrees with the reference, and the first activation to
depart is layer 0's attention, from position 1 on. mlx-lm 0.32.2 has this bug (a
strict expected failure, see conform_mlx/engines/mlx_lm_engine.py); a test below
plants the same bug in impl to show the check fails and how it is localized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import conform_mlx.impl.config
from conform_mlx.engines.impl_engine import ImplEngine
from conform_mlx.localize import first_departure
from conform_mlx.metrics import compare_logits
from suites.conftest import expect_known_issue
from suites.test_logits_parity import EngineRun, engine_logits
from suites.tolerances import NMSE_LIMIT

pytestmark = [
    pytest.mark.engine_suite,
    pytest.mark.checkpoint_group("tiny-rope-500k"),
]

SHAPE = "tiny-rope-500k"  # rope_theta 500000 under rope_parameters
TOKENS = np.random.default_rng(2).integers(3, 512, 24).tolist()
PREFILL_LEN = 7
LIMIT = NMSE_LIMIT["float32"]
LAYOUTS = ["rope_parameters", "top-level rope_theta"]


@pytest.fixture(scope="module")
def checkpoints(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The shape as transformers 5 writes it, and a copy with the legacy layout."""
    new = checkpoint(SHAPE)
    old = tmp_path_factory.mktemp("legacy") / SHAPE
    shutil.copytree(new, old)
    raw = json.loads((old / "config.json").read_text())
    raw["rope_theta"] = raw.pop("rope_parameters")["rope_theta"]
    (old / "config.json").write_text(json.dumps(raw, indent=2))
    return {"rope_parameters": new, "top-level rope_theta": old}


def nmse(run: EngineRun, ref) -> float:
    return compare_logits(np.concatenate(run.steps), ref.logits).nmse


def check_rope_base(run: EngineRun, ref) -> None:
    """float32 parity over prefill and decode. Out of tolerance, the departure must
    have a wrong base's signature (else AssertionError: something else is wrong);
    then pytest.fail names where it starts."""
    total = nmse(run, ref)
    if total <= LIMIT:
        return
    where = first_departure(run.trace, ref.trace, len(ref.keys), LIMIT)
    first = compare_logits(run.steps[0][:1], ref.logits[:1]).nmse
    assert (
        where is not None
        and where.name == "layers.0.self_attn"
        and where.first_position >= 1
        and first <= LIMIT
    ), (
        f"logits NMSE {total:.3g}, but not a RoPE-base departure (want layer 0 attention "
        f"from position 1, position 0 in tolerance): {where}, position 0 NMSE {first:.3g}"
    )
    pytest.fail(
        f"float32 logits NMSE {total:.3g} > {LIMIT:g} (position 0: {first:.3g}); {where.describe()}"
    )


@pytest.mark.conformance("RoPE base from {layout}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_base_500k_matches_reference(
    request, checkpoints, engine_factory, reference_factory, metric, layout
):
    path = checkpoints[layout]
    engine = engine_factory(path)
    expect_known_issue(request, engine, path)
    run = engine_logits(engine, TOKENS, PREFILL_LEN)
    ref = reference_factory(path).run(TOKENS)
    metric("NMSE", nmse(run, ref))
    check_rope_base(run, ref)


@pytest.mark.impl_only("plants the bug in impl's config reader")
def test_ignoring_rope_parameters_fails_and_is_localized(
    checkpoints, reference_factory, monkeypatch
):
    """impl made to read only a top-level rope_theta, as mlx-lm 0.32.2 does."""

    def top_level_only(raw, source):
        return float(raw.get("rope_theta", 10000.0)), conform_mlx.impl.config.RopeScaling()

    monkeypatch.setattr(conform_mlx.impl.config, "rope_fields", top_level_only)
    path = checkpoints["rope_parameters"]
    engine = ImplEngine.load(path, "float32")  # not the cached one: the config is read here
    run = engine_logits(engine, TOKENS, PREFILL_LEN)
    ref = reference_factory(path).run(TOKENS)
    with pytest.raises(
        pytest.fail.Exception,
        match=r"layer 0, attention \(layers\.0\.self_attn\).*from position [1-9]",
    ):
        check_rope_base(run, ref)
