"""Corpus metrics against stored reference logits (conform_mlx.kld, conform_mlx.goldens,
``conform reference`` and ``conform kld``): each metric on a case worked out by hand,
the top-k + rest KL against the full one, the goldens file's round trip and its
staleness checks, and an end-to-end run on the committed model that a planted fault
fails."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conform_mlx import versions
from conform_mlx.cli import main
from conform_mlx.engines import load_engine
from conform_mlx.kld import (
    CORPORA,
    CorpusMetrics,
    GoldensError,
    engine_logits_fn,
    golden_rows,
    judge,
    load_goldens,
    make_goldens,
    score_rows,
    summarize,
)
from conform_mlx.kld_cli import kld_failures
from conform_mlx.metrics import KLD_LIMIT
from conform_mlx.models import open_model

pytestmark = pytest.mark.impl_only(
    "tests the corpus metrics and goldens files (the harness); runs impl"
)

# Two positions over a vocabulary of 4, as probabilities; the next tokens are 1 and 2.
P_REF = np.array([[0.5, 0.25, 0.2, 0.05], [0.1, 0.6, 0.2, 0.1]])
P_ENG = np.array([[0.4, 0.3, 0.2, 0.1], [0.5, 0.3, 0.1, 0.1]])
TARGETS = np.array([1, 2])
KS = [1, 2, 3, 4]
# impl float32 vs HF float32 on tiny-gqa, ctx 64, 2 windows (2026-11-27): KL mean
# 6.9e-13, max 9.5e-12; ppl ratio 1 within 1e-7. Same arithmetic in another order, so
# 1e-9 leaves 1000x headroom; feeding each position the previous one's logits (the
# planted fault below) costs KL mean 0.89 and half the top-1 agreement.
PPL_RATIO_TOLERANCE = 1e-5


def hand_metrics(k: int) -> CorpusMetrics:
    gold = golden_rows(np.log(P_REF).astype(np.float32), TARGETS, k)
    scores = score_rows(np.log(P_ENG).astype(np.float32), TARGETS, gold)
    return summarize([scores], ctx=3, k=k, vocab=4)


def full_kl(ref_logits: np.ndarray, eng_logits: np.ndarray) -> np.ndarray:
    """Plain softmax over the whole row, no buckets: the quantity being bounded."""
    p = np.exp(ref_logits) / np.exp(ref_logits).sum(-1, keepdims=True)
    q = np.exp(eng_logits) / np.exp(eng_logits).sum(-1, keepdims=True)
    return (p * np.log(p / q)).sum(-1)


def test_each_metric_on_a_case_worked_by_hand():
    ln = math.log
    # k = 2. Row 0: the reference's top 2 are tokens 0, 1 (rest 0.25); the engine puts
    # 0.4, 0.3 there (rest 0.3). Row 1: top 2 are tokens 1, 2 (0.6, 0.2, rest 0.2);
    # the engine has 0.3, 0.1, rest 0.6.
    kl = [0.5 * ln(0.5 / 0.4) + 0.5 * ln(0.25 / 0.3), 0.8 * ln(2) + 0.2 * ln(0.2 / 0.6)]
    m = hand_metrics(2)
    assert (m.positions, m.windows, m.k, m.vocab, m.kl_exact) == (2, 1, 2, 4, False)
    assert m.kl_mean == pytest.approx(sum(kl) / 2, rel=1e-6)
    assert m.kl_median == pytest.approx(sum(kl) / 2, rel=1e-6)
    assert m.kl_max == pytest.approx(max(kl), rel=1e-6)
    assert m.kl_p99 == pytest.approx(min(kl) + 0.99 * (max(kl) - min(kl)), rel=1e-6)
    # Perplexity from the next tokens' probabilities: 0.3 and 0.1 (engine), 0.25 and
    # 0.2 (reference).
    assert m.ppl_engine == pytest.approx(1 / math.sqrt(0.3 * 0.1), rel=1e-6)
    assert m.ppl_reference == pytest.approx(1 / math.sqrt(0.25 * 0.2), rel=1e-6)
    assert m.ppl_ratio == pytest.approx(math.sqrt(0.05 / 0.03), rel=1e-6)
    # Argmax: 0 vs 0, then 1 (reference) vs 0 (engine).
    assert m.top1_agreement == 0.5
    # The reference's top token: 0.4 - 0.5, then 0.3 - 0.6.
    assert m.rms_dp_top == pytest.approx(math.sqrt((0.1**2 + 0.3**2) / 2), rel=1e-6)
    assert m.non_finite == []
    # k = vocab: the full KL (the 0.2 / 0.2 and 0.1 / 0.1 terms are 0).
    full = [
        0.5 * ln(0.5 / 0.4) + 0.25 * ln(0.25 / 0.3) + 0.05 * ln(0.05 / 0.1),
        0.1 * ln(0.1 / 0.5) + 0.6 * ln(0.6 / 0.3) + 0.2 * ln(0.2 / 0.1),
    ]
    exact = hand_metrics(4)
    assert exact.kl_exact and exact.kl_max == pytest.approx(max(full), rel=1e-6)
    assert exact.kl_mean == pytest.approx(sum(full) / 2, rel=1e-6)
    np.testing.assert_allclose(full, full_kl(np.log(P_REF), np.log(P_ENG)), rtol=1e-12)


@pytest.mark.parametrize("k", [1, 5, 31, 63])
def test_top_k_kl_is_the_full_kl_at_k_vocab_and_a_lower_bound_below(k):
    rng = np.random.default_rng(k)
    vocab, n = 64, 40
    ref = (rng.standard_normal((n, vocab)) * 3).astype(np.float32)
    eng = (ref + rng.standard_normal((n, vocab)) * 0.5).astype(np.float32)
    targets = rng.integers(0, vocab, n)
    full = full_kl(ref.astype(np.float64), eng.astype(np.float64))
    kl = score_rows(eng, targets, golden_rows(ref, targets, k)).kl
    exact = score_rows(eng, targets, golden_rows(ref, targets, vocab)).kl
    np.testing.assert_allclose(exact, full, rtol=1e-5, atol=1e-9)
    assert (kl <= full * (1 + 1e-6)).all()  # within the float32 logits' rounding
    assert (kl < full).any()  # merging outcomes loses something here


def test_non_finite_engine_rows_agree_with_nothing():
    ref = np.log(P_REF).astype(np.float32)
    eng = np.log(P_REF).astype(np.float32)
    eng[1, 3] = np.nan
    scores = score_rows(eng, TARGETS, golden_rows(ref, TARGETS, 2))
    m = summarize([scores, scores], ctx=3, k=2, vocab=4)
    assert m.non_finite == [1, 3] and m.top1_agreement == 0.5
    assert m.kl_mean == math.inf and m.ppl_engine == math.inf and m.rms_dp_top == math.inf


def bigram_logits(seed: int = 0, vocab: int = 512):
    """A fake model: each position's logits depend on its token alone."""
    table = (np.random.default_rng(seed).standard_normal((vocab, vocab)) * 4).astype(np.float32)
    return lambda ids: table[np.asarray(ids)]


@pytest.fixture(scope="module")
def fake_goldens(trained_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("goldens") / "fake.npz"
    make_goldens(trained_dir, "gpl-3.0", 16, 8, bigram_logits(), out, progress=False, max_windows=3)
    return out


def test_goldens_round_trip(fake_goldens, trained_dir):
    g = load_goldens(
        fake_goldens, model_path=trained_dir, corpus_text=CORPORA["gpl-3.0"].read_text()
    )
    assert (g.ctx, g.k, g.vocab, g.windows) == (16, 8, 512, 3)
    assert g.ids.shape == (48,) and g.rows.topk_ids.shape == (45, 8)
    n = len(load_tokenizer_ids(trained_dir, CORPORA["gpl-3.0"]))
    assert g.meta["corpus"] == "gpl-3.0" and g.meta["corpus_tokens"] == n
    assert g.meta["windows_available"] == n // 16 and g.meta["dropped_tail_tokens"] == n % 16
    assert g.ids.tolist() == load_tokenizer_ids(trained_dir, CORPORA["gpl-3.0"])[:48]
    m = judge(g, bigram_logits(), progress=False)
    assert m.positions == 45 and m.kl_max <= 1e-12 and m.top1_agreement == 1.0
    assert m.ppl_ratio == pytest.approx(1, abs=1e-6) and m.rms_dp_top < 1e-6
    other = judge(g, bigram_logits(seed=1), progress=False)
    assert other.kl_mean > 1 and other.top1_agreement < 0.2


def rewrite(src: Path, dst: Path, drop: str | None = None, **meta) -> Path:
    with np.load(src) as npz:
        arrays = {name: npz[name] for name in npz.files if name != drop}
    arrays["meta"] = np.array(json.dumps({**json.loads(str(arrays["meta"])), **meta}))
    np.savez(dst, **arrays)
    return dst


def other_model(trained_dir: Path, tmp_path: Path) -> Path:
    """The same weights under a config.json with one more key: another digest."""
    model = tmp_path / "other"
    model.mkdir()
    config = json.loads((trained_dir / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "note": "edited"}))
    (model / "model.safetensors").symlink_to(trained_dir / "model.safetensors")
    return model


def test_stale_goldens_are_refused(fake_goldens, trained_dir, tmp_path):
    text = CORPORA["gpl-3.0"].read_text()
    refusals = {
        "made from another model": dict(
            path=fake_goldens, model_path=other_model(trained_dir, tmp_path)
        ),
        "made from another text of corpus 'gpl-3.0'": dict(
            path=fake_goldens, corpus_text=text.replace("GNU", "GNV", 1)
        ),
        "meta format 2, but this conform reads format 1": dict(
            path=rewrite(fake_goldens, tmp_path / "v2.npz", format=2)
        ),
        "field 'topk_logp' missing": dict(
            path=rewrite(fake_goldens, tmp_path / "part.npz", drop="topk_logp")
        ),
        "meta field 'ctx' is 0, not an int >= 1": dict(
            path=rewrite(fake_goldens, tmp_path / "ctx.npz", ctx=0)
        ),
        "field 'ids' is int32 (48,), expected int (45,)": dict(
            path=rewrite(fake_goldens, tmp_path / "ctx15.npz", ctx=15)
        ),
    }
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(fake_goldens.read_bytes()[:2000])
    refusals["not a goldens file, or truncated"] = dict(path=truncated)
    for message, kwargs in refusals.items():
        with pytest.raises(GoldensError, match=re.escape(message)) as e:
            load_goldens(**kwargs)
        assert str(e.value).startswith(f"{kwargs['path']}: ")


def test_a_corpus_shorter_than_ctx_is_refused(trained_dir, tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("Everyone is permitted to copy and distribute verbatim copies.")
    n = len(load_tokenizer_ids(trained_dir, corpus))
    message = f"corpus {corpus}: {n} tokens, fewer than --ctx 512"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_goldens(trained_dir, corpus, 512, 8, bigram_logits(), tmp_path / "g.npz")
    assert not (tmp_path / "g.npz").exists()


def load_tokenizer_ids(model: Path, corpus: Path) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    return tokenizer.encode(corpus.read_text(), add_special_tokens=False).ids


def test_goldens_are_written_whole_or_not_at_all(trained_dir, tmp_path, monkeypatch):
    import conform_mlx.goldens

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conform_mlx.goldens.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        out = tmp_path / "g.npz"
        make_goldens(trained_dir, "gpl-3.0", 16, 8, bigram_logits(), out, False, max_windows=1)
    assert list(tmp_path.iterdir()) == []


def assert_close_to_reference(m: dict) -> None:
    """What the end-to-end run requires of an engine in float32."""
    assert not kld_failures(m, KLD_LIMIT["float32"]), kld_failures(m, KLD_LIMIT["float32"])
    assert m["top1_agreement"] == 1.0, f"top-1 agreement {m['top1_agreement']:.1%}"
    assert abs(m["ppl_ratio"] - 1) <= PPL_RATIO_TOLERANCE, f"ppl ratio {m['ppl_ratio']}"


@pytest.fixture(scope="module")
def real_goldens(trained_dir, tmp_path_factory) -> Path:
    """The HF reference's goldens of the committed model: ctx 64, 2 windows."""
    out = tmp_path_factory.mktemp("real") / "goldens.npz"
    argv = ["reference", "--model", str(trained_dir), "--ctx", "64", "--max-windows", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    return out


def test_impl_matches_the_stored_reference(real_goldens, trained_dir, tmp_path, capsys):
    argv = ["kld", "--engine", "impl", "--model", str(trained_dir), "--goldens", str(real_goldens)]
    assert main([*argv, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "a lower bound: top-32 + rest" in out and "(377 more cut by --max-windows)" in out
    report = json.loads((tmp_path / "kld-tiny-gqa-impl-float32.json").read_text())
    m = report["metrics"]
    assert (m["positions"], m["windows"], m["ctx"], m["k"]) == (126, 2, 64, 32)
    assert report["corpus_checked"] and report["goldens_meta"]["corpus"] == "gpl-3.0"
    assert report["versions"] == versions() and "versions   mlx " in out
    assert_close_to_reference(m)


def test_a_shifted_engine_fails_the_same_check(real_goldens, trained_dir):
    """Each position fed the previous one's logits: the check above must catch it."""
    base = engine_logits_fn(load_engine("impl", open_model(trained_dir), "float32"))

    def shifted(ids: list[int]) -> np.ndarray:
        x = base(ids)
        return np.concatenate([x[:1], x[:-1]])

    m = judge(load_goldens(real_goldens), shifted, progress=False)
    assert m.kl_mean > 0.1 and m.top1_agreement < 0.8
    with pytest.raises(AssertionError, match="KL mean .* > 1e-09"):
        assert_close_to_reference(m.as_dict())
    # conform kld's own verdict (its exit status) fails it the same way, in every dtype
    for dtype, limits in KLD_LIMIT.items():
        assert kld_failures(m.as_dict(), limits), dtype


def test_kld_imports_no_torch(real_goldens, trained_dir, tmp_path):
    code = (
        "import sys; from conform_mlx.cli import main; "
        f"rc = main(['kld', '--engine', 'impl', '--model', {str(trained_dir)!r}, "
        f"'--goldens', {str(real_goldens)!r}, '--out-dir', {str(tmp_path)!r}]); "
        "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "0 []"


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["validate", "--model", "nope"],
            "--model nope: no such file or directory, and not a known model (smollm2-135m)",
        ),
        (["reference", "--model", "smollm2"], "--model smollm2: no such file or directory"),
        (["kld", "--engine", "impl", "--model", "x/y", "--goldens", "g"], "--model x/y: no such"),
    ],
)
def test_model_flags_take_names_and_refuse_unknown_ones(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"conform {argv[0]}: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ctx", "1"], "--ctx 1: a window needs at least 2 tokens"),
        (["--ctx", "1024"], "--ctx 1024 exceeds the model's context length"),
        (["--top-k", "0"], "--top-k 0: must be at least 1"),
        (["--top-k", "513", "--ctx", "8", "--max-windows", "1"], "--top-k 513 exceeds"),
        (["--corpus", "nope"], "--corpus nope: no such file, and not a known corpus (gpl-3.0)"),
    ],
)
def test_reference_refuses_bad_input_with_exit_status_2(
    argv, message, trained_dir, tmp_path, capsys
):
    out = ["--out", str(tmp_path / "g.npz")]
    assert main(["reference", "--model", str(trained_dir), *argv, *out]) == 2
    assert f"conform reference: error: {message}" in capsys.readouterr().err


def test_kld_refuses_goldens_of_another_model(real_goldens, trained_dir, tmp_path, capsys):
    model = other_model(trained_dir, tmp_path)
    argv = ["kld", "--engine", "impl", "--model", str(model), "--goldens", str(real_goldens)]
    assert main([*argv, "--out-dir", str(tmp_path)]) == 2
    assert f"conform kld: error: {real_goldens}: made from another model" in capsys.readouterr().err


def test_corpora_are_committed_verbatim():
    """The text's license allows verbatim copies only; its README records the hash."""
    import hashlib

    readme = (CORPORA["gpl-3.0"].parent / "README.md").read_text()
    digest = hashlib.sha256(CORPORA["gpl-3.0"].read_bytes()).hexdigest()
    assert f"`{digest}`" in readme
    original = Path("/usr/share/common-licenses/GPL-3")  # Debian's base-files
    if original.is_file():
        assert original.read_bytes() == CORPORA["gpl-3.0"].read_bytes()
