"""Prompts as the model's tokenizer encodes them (issue 26): ``conform validate`` runs
the ids HF AutoTokenizer gives, BOS or none by the tokenizer's own rules, and never
adds a BOS by hand (that gave a no-BOS tokenizer [1, 504, ...], 1 being another token).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest

from conform_mlx import DEFAULT_MODEL
from conform_mlx.cli import main
from conform_mlx.impl.loader import read_config
from conform_mlx.models import load_tokenizer
from conform_mlx.reference.tokenizer import auto_tokenizer_ids
from conform_mlx.validate_io import DEFAULT_PROMPT, Options, encode_prompt

pytestmark = pytest.mark.impl_only("tests how the harness encodes prompts, not an engine")

BOS = 1  # "<s>" in the committed tokenizer and bos_token_id in its config.json
PROMPTS = [DEFAULT_PROMPT, "Hello", " leading space", "one\ntwo 3 four"]
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False}
KEEP = "keep"  # tiny-gqa's own post-processor: a template that writes "<s> $A"

# Copies of tiny-gqa's tokenizer that add no BOS: (post-processor, tokenizer_config.json
# additions). transformers 5 encodes by tokenizer.json's post-processor; add_bos_token in
# tokenizer_config.json changes nothing there, so the last one adds none either.
NO_BOS = {
    "byte-level": (BYTE_LEVEL, {}),  # SmolLM2's shape
    "no-post-processor": (None, {}),
    "byte-level-add_bos_token-true": (BYTE_LEVEL, {"add_bos_token": True}),
}
# A template that adds BOS, whatever tokenizer_config.json says.
WITH_BOS = {"template-add_bos_token-false": (KEEP, {"add_bos_token": False})}


def tokenizer_copy(root: Path, name: str, post: object, config: dict) -> Path:
    """tiny-gqa's config.json and tokenizer in ``root/name``, its post-processor
    replaced by ``post`` (unless KEEP) and ``config`` merged into tokenizer_config.json."""
    out = root / name
    out.mkdir()
    shutil.copy(DEFAULT_MODEL / "config.json", out)
    tok = json.loads((DEFAULT_MODEL / "tokenizer.json").read_text())
    if post != KEEP:
        tok["post_processor"] = post
    (out / "tokenizer.json").write_text(json.dumps(tok))
    tok_config = json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tok_config, **config}))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    made = {n: tokenizer_copy(root, n, *v) for n, v in {**NO_BOS, **WITH_BOS}.items()}
    return {"tiny-gqa": DEFAULT_MODEL, **made}


def encoded(model: Path, text: str) -> list[int]:
    """The ids ``conform validate --model model --prompt text`` runs."""
    opts = Options(model=model, prompt=text)
    return encode_prompt(model, load_tokenizer(model), opts)[0]


def old_encoded(model: Path, text: str) -> list[int]:
    """The old rule: the tokenizer's ids, config.json's bos_token_id put first by hand."""
    ids = load_tokenizer(model).encode(text).ids
    bos = read_config(model).bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


@pytest.mark.parametrize("text", [*PROMPTS, "<s> twice"])
@pytest.mark.parametrize("name", ["tiny-gqa", *NO_BOS, *WITH_BOS])
def test_prompt_ids_are_autotokenizers(folders, name, text):
    assert encoded(folders[name], text) == auto_tokenizer_ids(folders[name], text)


@pytest.mark.parametrize("text", PROMPTS)
def test_tiny_gqa_adds_bos_itself(text):
    """Its template writes "<s>": the old hand-added BOS never fired, so validate's
    numbers for the committed model are unchanged."""
    ids = encoded(DEFAULT_MODEL, text)
    assert ids[0] == BOS and ids[1] != BOS
    assert ids == old_encoded(DEFAULT_MODEL, text)


@pytest.mark.parametrize("text", PROMPTS)
@pytest.mark.parametrize("name", NO_BOS)
def test_a_tokenizer_without_bos_gets_none(folders, name, text):
    ids = encoded(folders[name], text)
    assert ids[0] != BOS and ids == auto_tokenizer_ids(folders[name], text)
    # The old rule put BOS first: the tests above fail on it.
    assert old_encoded(folders[name], text) == [BOS, *ids]


def test_validate_runs_the_tokenizers_ids(folders, tmp_path):
    """The issue's case end to end: the report's prompt has no hand-added BOS."""
    model = Path(shutil.copytree(folders["byte-level"], tmp_path / "byte-level"))
    (model / "model.safetensors").symlink_to(DEFAULT_MODEL / "model.safetensors")
    argv = ["validate", "--model", str(model), "--max-new-tokens", "2"]
    assert main([*argv, "--out-dir", str(tmp_path / "out")]) == 0
    (path,) = (tmp_path / "out").glob("validate-byte-level-*.json")
    ids = json.loads(path.read_text())["prompt"]["ids"]
    assert ids == auto_tokenizer_ids(model, DEFAULT_PROMPT) and ids[0] != BOS


def tokenizer_gguf(path: Path, kind: str, add_bos: bool | None) -> Path:
    """A GGUF file of tiny-gqa's hyperparameters and vocabulary (no tensors: enough for
    its config and tokenizer) as tokenizer kind ``kind``, add_bos_token ``add_bos``."""
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    tok = json.loads((DEFAULT_MODEL / "tokenizer.json").read_text())["model"]
    tokens = sorted(tok["vocab"], key=tok["vocab"].get)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_tokenizer_model(kind)
    w.add_token_list(tokens)
    if kind == "gpt2":
        w.add_token_merges([" ".join(m) for m in tok["merges"]])
    else:
        w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(2)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "kind,add_bos,starts_with_bos",
    [
        ("gpt2", True, True),
        ("gpt2", False, False),
        ("gpt2", None, False),  # llama.cpp's default for BPE
        ("llama", None, True),  # and for SentencePiece
        ("llama", False, False),
    ],
)
def test_gguf_follows_add_bos_token(tmp_path, kind, add_bos, starts_with_bos):
    """GGUF files keep the old ids: the file's tokenizer applies add_bos_token itself."""
    path = tokenizer_gguf(tmp_path / "tok.gguf", kind, add_bos)
    ids = encoded(path, DEFAULT_PROMPT)
    assert (ids[0] == BOS) == starts_with_bos
    assert ids == old_encoded(path, DEFAULT_PROMPT)
