"""The GPU tools' own logic, on the CPU: how ``tools/gpu_bench.py`` counts a step's
launches and splits its time, how ``tools/gpu_profile.py`` reads ncu's CSV, and which
launch shapes ``tools/gpu_kernels_check.py`` sweeps. Their GPU numbers are only as
good as these parts."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import pytest

from conform_mlx.engines import load_engine
from conform_mlx.impl.kernels.policy import KernelPolicy, current_policy, use_policy, variant
from conform_mlx.models import open_model
from tools import gpu_bench, gpu_kernels_check, gpu_policy_ab, gpu_profile

pytestmark = pytest.mark.impl_only("tests the GPU tools' own logic (tools/), not an engine")


def test_graph_primitives_names_each_unevaluated_op() -> None:
    a = mx.ones((4,))
    mx.eval(a)
    seen = gpu_bench.graph_primitives([(a * 2 + 1).sum()])
    assert seen["Multiply"] == 1 and seen["Add"] == 1 and seen["Sum"] == 1
    assert gpu_bench.graph_primitives([a]) == {}  # evaluated: nothing left to launch


def test_watching_eval_records_and_puts_eval_back() -> None:
    real, real_async = mx.eval, mx.async_eval
    with pytest.raises(RuntimeError), gpu_bench.watching_eval() as seen:
        x = mx.arange(3) * 3
        y = x + 1
        mx.async_eval(x)  # queued early by an engine: counted with the final eval
        mx.eval(y)
        assert y.tolist() == [1, 4, 7]
        raise RuntimeError("a failing step")
    assert mx.eval is real and mx.async_eval is real_async
    assert seen["primitives"]["Multiply"] == 1 and seen["primitives"]["Add"] == 1


def test_watching_eval_times_an_engines_early_queueing() -> None:
    with gpu_bench.watching_eval(count=False) as seen:
        x = mx.arange(3) * 3
        mx.async_eval(x)
        assert seen["encode_s"] > 0 and seen["wait_s"] == 0
        mx.eval(x + 1)
    assert seen["wait_s"] > 0


def test_compiled_step_launches_fewer_kernels(checkpoint) -> None:
    """The launch estimate sees what mx.compile fuses: a compiled decode step of the
    same model has fewer non-view primitives than the eager one."""
    path = checkpoint("tiny-gqa4")
    launches = {}
    for name in ("impl", "impl-compiled"):
        step = gpu_bench.decode_step(load_engine(name, open_model(path), "float32"), [20])
        anatomy = gpu_bench.step_anatomy(step, reps=2)
        assert anatomy["wall_ms"] > 0 and anatomy["wait_ms"] >= 0
        launches[name] = anatomy["launches"]
    assert 0 < launches["impl-compiled"] < launches["impl"]


def test_interleaved_steps_follow_each_other_alike() -> None:
    """Within the reps each function runs right after each other one equally often
    (a fixed a, b, c order would put b after a every time, and give one order, not
    six), and every sample lands in its own function's list."""
    calls: list[int] = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    times = gpu_bench.interleaved_samples(fns, warmup=1, reps=12)
    assert [len(t) for t in times] == [12, 12, 12]
    reps = [calls[3 + 3 * r : 6 + 3 * r] for r in range(12)]  # after one warm-up round
    assert len({tuple(r) for r in reps}) == 6  # every order of three
    follows = Counter(pair for r in reps for pair in zip(r, r[1:]))
    assert set(follows.values()) == {4} and len(follows) == 6
    assert gpu_bench.rep_order(5, 2) == (2, 3, 4, 0, 1)


def test_paired_ratios_are_quartiles_of_each_reps_ratio() -> None:
    q1, median, q3 = gpu_bench.paired_ratios([2.0, 4.0, 6.0, 8.0], [4.0] * 4)
    assert (q1, median, q3) == pytest.approx((0.875, 1.25, 1.625))
    # A tokens/s row: the rate ratio, the reference's time over the engine's.
    assert gpu_bench.paired_ratios([2.0, 2.0], [4.0, 4.0], per_s=True) == [2.0] * 3
    with pytest.raises(ValueError):  # samples from different runs cannot be paired
        gpu_bench.paired_ratios([1.0, 2.0], [1.0])


def test_paired_ratios_cancel_drift_that_medians_do_not() -> None:
    """The host slows down 3x halfway through: each pair still reads 0.8, while the
    engines' separate spreads overlap (the reason the bench pairs reps)."""
    ref = [5.0] * 10 + [15.0] * 10
    ours = [0.8 * t for t in ref]
    assert gpu_bench.paired_ratios(ours, ref) == pytest.approx([0.8] * 3)
    assert max(ours) > min(ref)


def test_ncu_csv_rows_become_one_record_per_launch() -> None:
    head = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
    rows = [
        '"0","gemv","gpu__time_duration.sum","usecond","2.50"',
        '"0","gemv","launch__block_size","","256"',
        '"0","gemv","launch__grid_size","","4"',
        '"1","norm","gpu__time_duration.sum","nsecond","1,500"',
    ]
    text = "==PROF== a log line\n" + head + "\n".join(rows)
    assert gpu_profile.kernels(text) == [("gemv", 2500.0, 1024), ("norm", 1500.0, 0)]
    assert gpu_profile.kernels("no csv here") == []


@pytest.mark.parametrize("heads", list(gpu_kernels_check.HEADS))
@pytest.mark.parametrize(("batch", "context"), gpu_kernels_check.POINTS)
def test_kernel_sweep_holds_the_policy(batch: int, context: int, heads: str) -> None:
    from conform_mlx.impl.kernels.paged_attention import launch_plan

    g = gpu_kernels_check
    h = g.HEADS[heads]
    n_blocks = -(-context // g.BLOCK_SIZE)
    shapes = g.sweep(batch, context, n_blocks, h)
    plan = launch_plan(batch, h.n_kv, n_blocks, g.BLOCK_SIZE, h.n_heads // h.n_kv, h.head_dim)
    assert plan == g.plan(batch, n_blocks, h)
    assert plan in shapes
    assert all(parts <= n_blocks for _, parts in shapes)


def test_pool_io_times_both_ways_and_finds_them_equal() -> None:
    """gpu_kernels_check --pool-io compares impl's words with the element-wise way; both
    write and gather the same bits, else the tool's exit status says so."""
    rows = gpu_kernels_check.time_pool_io(2, [40], gpu_kernels_check.HEADS["llama3-8b"], chunk=8)
    (r,) = rows
    assert r["bitwise_same"] is True
    assert r["gather_mb"] == 48 * 2 * 8 * 128 * 2 / 1e6
    assert set(r["write_ms"]) == set(r["gather_ms"]) == {"elements", "words"}


def test_policy_ab_runs_each_step_under_its_policy() -> None:
    """gpu_policy_ab's variants differ only while their step runs, and not after."""
    seen = []

    def step() -> None:
        seen.append(current_policy())

    gpu_policy_ab.under(variant("no-early"), step)()
    gpu_policy_ab.under(None, step)()  # a peer engine: the default
    with pytest.raises(RuntimeError), use_policy(variant("fused-norm")):
        raise RuntimeError("a failing step")
    assert seen[0].commits(22, False) == () and seen[0].split_tokens == 128
    assert seen[1] == current_policy() == KernelPolicy.measured()
    assert current_policy().commits(22, False) == (15, 17, 19)


def test_spare_room_fits_a_budget() -> None:
    """The roomy-cache row keeps TinyLlama's 256 spare sequences, and shrinks an 8B
    model's to what 4 GB holds (256 would be 17 GB at Llama-3-8B's heads, 67 at Llama-2-7B's)."""
    from types import SimpleNamespace

    def shape(layers: int, kv_heads: int, head_dim: int) -> SimpleNamespace:
        return SimpleNamespace(
            num_hidden_layers=layers, num_key_value_heads=kv_heads, dim_per_head=head_dim
        )

    assert gpu_bench.spare_sequences(shape(22, 4, 64), "float16") == 256  # 11.5 MB each
    assert gpu_bench.spare_sequences(shape(32, 8, 128), "float16") == 59  # 67 MB each
    assert gpu_bench.spare_sequences(shape(32, 32, 128), "float16") == 14  # 268 MB each
    assert gpu_bench.spare_sequences(shape(32, 32, 128), "float32") == 7


def test_kv_bytes_beside_the_formula() -> None:
    """impl's paged cache holds whole blocks of 16: at 100 tokens, 112 tokens' bytes; at a
    block edge, exactly the formula's."""
    from conform_bench import common
    from conform_mlx.engines import load_engine
    from conform_mlx.impl.loader import read_config
    from conform_mlx.models import open_model

    path = common.checkpoint("small")
    engine = load_engine("impl", open_model(path), "float16")
    rows = gpu_bench.kv_bytes_at({"impl": engine}, read_config(path), "float16", [100, 128])
    per_token = 2 * 4 * 1 * 64 * 2  # K and V, 4 layers, 1 KV head, head_dim 64, float16
    assert rows[100] == {"formula": 100 * per_token, "impl": 112 * per_token}
    assert rows[128] == {"formula": 128 * per_token, "impl": 128 * per_token}
