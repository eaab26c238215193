"""Hostile input files (issue 27): a goldens file whose meta or arrays are damaged, a
corpus that is not UTF-8 or empty, GGUF metadata whose strings are not UTF-8. Each is
refused by the command that reads it with exit status 2 and one line naming the file
and the field (or key), before any work and with nothing written.

Every goldens case starts from one good file (made from impl's own logits, so the
undamaged file passes ``conform kld``) and changes one thing; the GGUF cases patch one
string's bytes in a file that otherwise loads.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

import conform_mlx.goldens
import conform_mlx.reference.tokenizer
from conform_mlx.cli import main
from conform_mlx.engines import load_engine
from conform_mlx.goldens import META_KEYS
from conform_mlx.impl import gguf as impl_gguf
from conform_mlx.kld import engine_logits_fn, make_goldens
from conform_mlx.models import open_model
from conform_mlx.reference import gguf_writer
from conform_mlx.reference.tokenizer import gguf_tokenizer

pytestmark = pytest.mark.impl_only(
    "tests how the conform commands refuse damaged input files; they run impl"
)

CTX, K, WINDOWS, VOCAB = 16, 8, 3, 512  # the good goldens: 3 windows of tiny-gqa's 16
N = WINDOWS * (CTX - 1)  # scored positions
DROP = object()  # a meta value: remove the key


def exit_status(argv: list[str], capsys) -> tuple[int | str | None, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    return code, capsys.readouterr().err


def assert_refused(code, err: str, prog: str, path: Path, *names: str) -> None:
    """Exit status 2 and one last line ``prog: error: <path>...`` naming each of names."""
    assert code == 2, f"exit status {code!r}, stderr: {err!r}"
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and str(path) in last, last
    for name in names:
        assert name in last, f"{name!r} not named in: {last}"


# --- goldens ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_goldens(trained_dir, tmp_path_factory) -> Path:
    """impl's own logits over 3 windows of the registered corpus: conform kld passes it."""
    out = tmp_path_factory.mktemp("goldens") / "good.npz"
    logits = engine_logits_fn(load_engine("impl", open_model(trained_dir), "float32"))
    make_goldens(trained_dir, "gpl-3.0", CTX, K, logits, out, progress=False, max_windows=WINDOWS)
    return out


def damaged(
    src: Path,
    dst: Path,
    meta: dict | None = None,
    arrays: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> Path:
    """A copy of ``src`` with meta keys set (a callable: of the old value; DROP: removed)
    and the arrays edited in place by ``arrays``."""
    with np.load(src) as npz:
        fields = {name: npz[name] for name in npz.files}
    m = json.loads(str(fields["meta"]))
    for key, value in (meta or {}).items():
        if value is DROP:
            del m[key]
        else:
            m[key] = value(m.get(key)) if callable(value) else value
    fields["meta"] = np.array(json.dumps(m))
    if arrays:
        arrays(fields)
    np.savez(dst, **fields)
    return dst


def kld_argv(model: Path, goldens: Path, out_dir: Path, *more: str) -> list[str]:
    return ["kld", "--engine", "impl", "--model", str(model), "--goldens", str(goldens),
            "--out-dir", str(out_dir), *more]  # fmt: skip


def test_the_good_goldens_pass(good_goldens, trained_dir, tmp_path, capsys):
    """The cases below differ from this file in one field: what refuses them is that field."""
    assert main(kld_argv(trained_dir, good_goldens, tmp_path / "out")) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["kld-tiny-gqa-impl-float32.json"]
    assert "PASS" in capsys.readouterr().out


# (meta key, value) made null: every field the writer never writes as null.
NULLS = [(key, None) for key in META_KEYS if key not in ("transformers", "torch")]
# (meta key, value or function of the old value, what the error line must say)
META_CASES = [
    *[(key, None, f"meta field {key!r} is None") for key, _ in NULLS],
    ("format", "1", "meta field 'format' is '1', not an int"),
    ("format", True, "meta field 'format' is True, not an int"),
    ("format", 1.0, "meta field 'format' is 1.0, not an int"),
    ("format", 2, "meta format 2, but this conform reads format 1"),
    ("model_path", 7, "meta field 'model_path' is 7, not a non-empty string"),
    ("model_path", "", "meta field 'model_path' is '', not a non-empty string"),
    ("model_digest", "abc", "meta field 'model_digest' is 'abc', not a sha256"),
    ("model_digest", str.upper, "meta field 'model_digest' is '"),
    ("corpus", ["gpl-3.0"], "meta field 'corpus' is ['gpl-3.0'], not a non-empty string"),
    ("corpus", "", "meta field 'corpus' is '', not a non-empty string"),
    ("corpus_path", {}, "meta field 'corpus_path' is {}, not a non-empty string"),
    ("corpus_path", "a\x00b", "meta field 'corpus_path' is 'a\\x00b', not a non-empty string"),
    ("corpus_sha256", "z" * 64, "meta field 'corpus_sha256' is 'zzz"),
    ("token_ids_sha256", 0, "meta field 'token_ids_sha256' is 0, not a sha256"),
    ("corpus_tokens", str, "meta field 'corpus_tokens' is '"),
    ("corpus_tokens", -1, "meta field 'corpus_tokens' is -1, not an int >= 1"),
    ("corpus_tokens", lambda n: n + 1, "meta field 'corpus_tokens' is "),
    ("ctx", "16", "meta field 'ctx' is '16', not an int >= 1"),
    ("ctx", 16.0, "meta field 'ctx' is 16.0, not an int >= 1"),
    ("ctx", 0, "meta field 'ctx' is 0, not an int >= 1"),
    ("ctx", 1, "meta field 'ctx' is 1; a window needs at least 2 tokens"),
    ("ctx", 17, "field 'ids' is int32 (48,), expected int (51,)"),
    ("k", True, "meta field 'k' is True, not an int >= 1"),
    ("k", 0, "meta field 'k' is 0, not an int >= 1"),
    ("k", VOCAB + 1, "meta field 'k' is 513, more than field 'vocab' (512)"),
    ("k", K - 1, f"field 'topk_ids' is int32 ({N}, {K}), expected int ({N}, {K - 1})"),
    ("vocab", "512", "meta field 'vocab' is '512', not an int >= 1"),
    ("vocab", 0, "meta field 'vocab' is 0, not an int >= 1"),
    ("vocab", K - 1, "meta field 'k' is 8, more than field 'vocab' (7)"),
    ("vocab", 20, "field 'ids' has ids outside [0, 20)"),
    ("windows", 3.0, "meta field 'windows' is 3.0, not an int >= 1"),
    ("windows", 0, "meta field 'windows' is 0, not an int >= 1"),
    ("windows", 2, "field 'ids' is int32 (48,), expected int (32,)"),
    ("windows_available", "9", "meta field 'windows_available' is '9', not an int >= 1"),
    ("windows_available", 0, "meta field 'windows_available' is 0, not an int >= 1"),
    ("windows_available", 2, "field 'windows_available' is 2, fewer than field 'windows' (3)"),
    ("windows_available", lambda n: n + 1, "fields 'windows_available' x 'ctx'"),
    ("dropped_tail_tokens", -1, "meta field 'dropped_tail_tokens' is -1, not an int >= 0"),
    ("dropped_tail_tokens", 1.5, "meta field 'dropped_tail_tokens' is 1.5, not an int >= 0"),
    ("dropped_tail_tokens", CTX, "field 'dropped_tail_tokens' is 16, not fewer than field 'ctx'"),
    ("dropped_tail_tokens", lambda n: (n + 1) % CTX, "+ 'dropped_tail_tokens' = "),
    ("transformers", 4, "meta field 'transformers' is 4, not a version string or null"),
    ("transformers", "", "meta field 'transformers' is '', not a version string or null"),
    ("torch", ["2.0"], "meta field 'torch' is ['2.0'], not a version string or null"),
    ("created", 0, "meta field 'created' is 0, not an ISO 8601 time"),
    ("created", "yesterday", "meta field 'created' is 'yesterday', not an ISO 8601 time"),
    ("windows_available", DROP, "meta field 'windows_available' missing"),
    ("note", "edited", "meta field 'note' is not one of format 1's"),
]


def _set(name: str, value: Callable[[np.ndarray], np.ndarray]):
    def edit(fields: dict[str, np.ndarray]) -> None:
        fields[name] = value(fields[name].copy())

    return edit


def _at(index, value):
    def put(a: np.ndarray) -> np.ndarray:
        a[index] = value
        return a

    return put


def _as(name: str, dtype) -> Callable[[dict[str, np.ndarray]], None]:
    return _set(name, lambda a: a.astype(dtype))


def _repeat(a: np.ndarray) -> np.ndarray:
    a[0, 1] = a[0, 0]
    return a


def _target_is_top_1(fields: dict[str, np.ndarray]) -> None:
    """Out of the top k, the next token's log-prob is at most the k-th's; in it, equal."""
    fields["target_logp"] = fields["topk_logp"][:, 0].copy()


def _drop(name: str):
    return lambda fields: fields.pop(name)


# (id, the arrays' edit, what the error line must say)
ARRAY_CASES = [
    ("meta-int", _set("meta", lambda a: np.array(5)), "field 'meta' is int64 (), not a JSON"),
    ("meta-2-strings", _set("meta", lambda a: np.array([str(a)] * 2)), "field 'meta' is <U"),
    ("meta-not-json", _set("meta", lambda a: np.array("{")), "field 'meta' is not a JSON string"),
    ("meta-a-list", _set("meta", lambda a: np.array("[1]")), "field 'meta' is not a JSON object"),
    ("ids-missing", _drop("ids"), "field 'ids' missing"),
    ("ids-int64", _as("ids", np.int64), "field 'ids' is int64, expected int32"),
    ("ids-float", _as("ids", np.float32), "field 'ids' is float32 (48,)"),
    ("ids-short", _set("ids", lambda a: a[:-1]), "field 'ids' is int32 (47,), expected int (48,)"),
    ("ids-2d", _set("ids", lambda a: a.reshape(WINDOWS, CTX)), "field 'ids' is int32 (3, 16)"),
    ("ids-past-vocab", _set("ids", _at(5, VOCAB)), "field 'ids' has ids outside [0, 512)"),
    ("ids-negative", _set("ids", _at(5, -1)), "field 'ids' has ids outside [0, 512)"),
    ("ids-reversed", _set("ids", lambda a: a[::-1]), "field 'ids' does not match meta token_ids"),
    ("topk_ids-int64", _as("topk_ids", np.int64), "'topk_ids' is int64,"),
    ("topk_ids-uint32", _as("topk_ids", np.uint32), "'topk_ids' is uint32"),
    ("topk_ids-narrow", _set("topk_ids", lambda a: a[:, :-1]), "field 'topk_ids' is int32 (45, 7)"),
    ("topk_ids-object", _as("topk_ids", object), "'topk_ids' cannot be read"),
    ("topk_ids-past-vocab", _set("topk_ids", _at((0, 3), VOCAB)), "field 'topk_ids' has ids out"),
    ("topk_ids-repeated", _set("topk_ids", _repeat), "'topk_ids' repeats"),
    ("topk_logp-missing", _drop("topk_logp"), "field 'topk_logp' missing"),
    ("topk_logp-float64", _as("topk_logp", np.float64), "'topk_logp' is float64"),
    ("topk_logp-float16", _as("topk_logp", np.float16), "'topk_logp' is float16"),
    ("topk_logp-short", _set("topk_logp", lambda a: a[1:]), "field 'topk_logp' is float32 (44, 8)"),
    ("topk_logp-nan", _set("topk_logp", _at((2, 0), np.nan)), "field 'topk_logp' holds NaN, inf"),
    ("topk_logp-positive", _set("topk_logp", _at((2, 0), 0.5)), "field 'topk_logp' holds NaN, inf"),
    ("topk_logp-reversed", _set("topk_logp", lambda a: a[:, ::-1]), "'topk_logp' is not largest"),
    ("topk_logp-minus-1", _set("topk_logp", lambda a: a - 1), "fields 'topk_logp' and 'rest_logp'"),
    ("rest_logp-float64", _as("rest_logp", np.float64), "'rest_logp' is float64"),
    ("rest_logp-column", _set("rest_logp", lambda a: a[:, None]), "'rest_logp' is float32 (45, 1)"),
    ("rest_logp-nan", _set("rest_logp", _at(4, np.nan)), "field 'rest_logp' holds NaN"),
    ("rest_logp-positive", _set("rest_logp", _at(4, 0.5)), "field 'rest_logp' holds NaN or a log"),
    ("rest_logp-zero", _set("rest_logp", np.zeros_like), "and 'rest_logp' do not sum"),
    ("target_logp-int", _as("target_logp", np.int32), "'target_logp' is int32"),
    ("target_logp-inf", _set("target_logp", _at(7, np.inf)), "field 'target_logp' holds NaN, inf"),
    ("target_logp-top-1", _target_is_top_1, "field 'target_logp' disagrees with 'topk_logp'"),
]  # fmt: skip


def _case_id(key: str, value: object) -> str:
    shown = getattr(value, "__name__", None) or ("drop" if value is DROP else repr(value))
    return f"{key}={shown}"[:40]


@pytest.mark.parametrize(
    "key,value,message",
    META_CASES,
    ids=[_case_id(k, v) for k, v, _ in META_CASES],
)
def test_kld_refuses_damaged_goldens_meta(
    key, value, message, good_goldens, trained_dir, tmp_path, capsys
):
    path = damaged(good_goldens, tmp_path / "damaged.npz", meta={key: value})
    out = tmp_path / "out"
    code, err = exit_status(kld_argv(trained_dir, path, out), capsys)
    assert_refused(code, err, "conform kld", path, message)
    assert list(out.iterdir()) == [], "a report was written"


@pytest.mark.parametrize(
    "edit,message", [c[1:] for c in ARRAY_CASES], ids=[c[0] for c in ARRAY_CASES]
)
def test_kld_refuses_damaged_goldens_arrays(
    edit, message, good_goldens, trained_dir, tmp_path, capsys
):
    path = damaged(good_goldens, tmp_path / "damaged.npz", arrays=edit)
    out = tmp_path / "out"
    code, err = exit_status(kld_argv(trained_dir, path, out), capsys)
    assert_refused(code, err, "conform kld", path, message)
    assert list(out.iterdir()) == [], "a report was written"


def test_without_the_meta_check_the_damage_reaches_the_run(
    good_goldens, trained_dir, tmp_path, monkeypatch
):
    """The issue's case with the meta check taken out: every window runs, then a
    TypeError and no report. The check above is what turns it into exit status 2."""
    monkeypatch.setattr(conform_mlx.goldens, "_meta", lambda path, raw: json.loads(str(raw)))
    monkeypatch.setattr(conform_mlx.goldens, "_check_corpus_tokens", lambda path, meta: None)
    path = damaged(good_goldens, tmp_path / "damaged.npz", meta={"windows_available": None})
    with pytest.raises(TypeError):
        main(kld_argv(trained_dir, path, tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


# --- corpora ------------------------------------------------------------------------

CORPUS_CASES = {
    "not-utf8": (b"GNU General Public License \xff\xfe version 3\n", "not UTF-8 text (byte 27"),
    "empty": (b"", "empty (no text to tokenize)"),
    "white-space": (b" \n\t\n", "empty (no text to tokenize)"),
}


@pytest.mark.parametrize("command", ["kld", "reference", "kld-own-corpus"])
@pytest.mark.parametrize("case", list(CORPUS_CASES))
def test_a_bad_corpus_is_refused_by_name(
    case, command, good_goldens, trained_dir, tmp_path, capsys
):
    data, message = CORPUS_CASES[case]
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(data)
    out = tmp_path / "out"
    if command == "reference":
        argv = ["reference", "--model", str(trained_dir), "--corpus", str(corpus), "--ctx", "16",
                "--out", str(out / "g.npz")]  # fmt: skip
    elif command == "kld":
        argv = kld_argv(trained_dir, good_goldens, out, "--corpus", str(corpus))
    else:  # no --corpus: the goldens name their own corpus file, which is now damaged
        meta = {"corpus": "mine", "corpus_path": str(corpus)}
        argv = kld_argv(trained_dir, damaged(good_goldens, tmp_path / "g.npz", meta), out)
    code, err = exit_status(argv, capsys)
    assert_refused(code, err, f"conform {command.removesuffix('-own-corpus')}", corpus, message)
    assert not out.exists() or list(out.iterdir()) == []


# --- GGUF metadata --------------------------------------------------------------------


def add_tokenizer(w: gguf.GGUFWriter, model: Path) -> None:
    """``model``'s byte-level BPE tokenizer as GGUF metadata (kind gpt2)."""
    tok = json.loads((model / "tokenizer.json").read_text())["model"]
    tokens = sorted(tok["vocab"], key=tok["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) for m in tok["merges"]])
    w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def with_tokenizer(model: Path, out: Path) -> Path:
    """reference.gguf_writer's Q8_0 file of ``model``, its tokenizer in the metadata."""

    class Writer(gguf.GGUFWriter):
        def write_header_to_file(self, *args, **kwargs):
            add_tokenizer(self, model)
            super().write_header_to_file(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_writer.gguf, "GGUFWriter", Writer)
        return gguf_writer.write_gguf(model, out, "Q8_0")


def patch_bytes(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    """A copy of ``src`` with its one occurrence of ``old`` made ``new`` (same length)."""
    data = src.read_bytes()
    assert len(new) == len(old) and data.count(old) == 1, old
    dst.write_bytes(data.replace(old, new))
    return dst


@pytest.fixture(scope="module")
def ggufs(trained_dir, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (file, the key its error must name): a good file and two bad ones."""
    root = tmp_path_factory.mktemp("gguf")
    good = with_tokenizer(trained_dir, root / "good.gguf")
    vocab = json.loads((trained_dir / "tokenizer.json").read_text())["model"]["vocab"]
    token = max((t for t in vocab if t.isascii() and t.isalpha()), key=len)
    # A GGUF string: its uint64 length, then its bytes; a key's value follows its type.
    arch = b"general.architecture" + struct.pack("<IQ", gguf.GGUFValueType.STRING, 5)
    length = struct.pack("<Q", len(token))
    return {
        "good": (good, ""),
        "architecture": (
            patch_bytes(good, root / "arch.gguf", arch + b"llama", arch + b"ll\xffma"),
            "general.architecture",
        ),
        "token": (
            patch_bytes(
                good,
                root / "token.gguf",
                length + token.encode(),
                length + b"\xff" + token.encode()[1:],
            ),
            f"tokenizer.ggml.tokens[{vocab[token]}]",
        ),  # fmt: skip
    }


def test_the_good_gguf_loads_with_its_tokenizer(ggufs):
    path, _ = ggufs["good"]
    model = open_model(path)
    assert model.tokenizer is not None and model.config.vocab_size == VOCAB


@pytest.mark.parametrize("command", ["validate", "reference"])
@pytest.mark.parametrize("case", ["architecture", "token"])
def test_a_gguf_string_not_utf8_is_refused_by_key(case, command, ggufs, tmp_path, capsys):
    path, key = ggufs[case]
    out = tmp_path / "out"
    if command == "validate":
        argv = ["validate", "--model", str(path), "--tokens", "1,2,3", "--out-dir", str(out)]
    else:
        argv = ["reference", "--model", str(path), "--ctx", "16", "--out", str(out / "g.npz")]
    code, err = exit_status(argv, capsys)
    assert_refused(code, err, f"conform {command}", path, f"metadata {key} is not UTF-8 text")
    assert not out.exists() or list(out.iterdir()) == []


def test_each_gguf_string_check_names_the_key(ggufs, monkeypatch):
    """impl's check of every string (impl.gguf.check_strings) first; without
    it, impl's own reads (architecture) and the tokenizer's (tokens) still name the key;
    without those too, the codec's message names neither file nor key (the issue)."""
    arch, arch_key = ggufs["architecture"]
    token, token_key = ggufs["token"]
    monkeypatch.setattr(impl_gguf, "check_strings", lambda reader, path: None)
    with pytest.raises(ValueError, match=rf"metadata {arch_key} is not UTF-8 text"):
        open_model(arch)
    with pytest.raises(ValueError, match=re.escape(f"{token}: metadata {token_key} is not")):
        gguf_tokenizer(token)
    monkeypatch.setattr(conform_mlx.reference.tokenizer, "_check_strings", lambda r, p: None)
    with pytest.raises(ValueError) as e:
        gguf_tokenizer(token)
    assert token_key not in str(e.value)
