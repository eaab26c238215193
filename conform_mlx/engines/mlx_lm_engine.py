"""mlx-lm behind the engine interface (needs the ``peers`` extra). This is the only
module that imports mlx_lm.

mlx-lm's cache is one ``KVCache`` per layer per sequence: a (1, kv_heads, slots,
head_dim) buffer for K and one for V that grows by ``KVCache.step`` (256) slots
when full. It is not paged, so it has no block accounting.

A batched decode runs the way mlx-lm batches: the sequences become the rows of one
left-padded ``BatchKVCache`` per layer (see ``MlxLmCache.batch``).

The trace is taken by putting recorders in front of each layer and its
sub-modules for the duration of one call; the model is left as it was.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Collection, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache
from mlx_lm.utils import load_model

from conform_mlx.engines import Engine, EngineCache, NotApplicable, Trace, check_dtype, chunks

# Versions measured to ignore config.json's `rope_parameters` (transformers 5's layout)
# and run RoPE with the defaults (base 10000, no scaling): 0.32.2 on 2026-11-27.
ROPE_PARAMETERS_IGNORED = {"0.32.2"}
_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class _Batch:
    """Sequences decoded together: row i of every layer's BatchKVCache is seqs[i].

    held[s] - tokens[s] is a trim not yet applied: a BatchKVCache can only trim every
    row at once, which it does at the next batched step if the pending trims agree.
    """

    seqs: tuple[Hashable, ...]
    layers: list[BatchKVCache]
    held: dict[Hashable, int]  # positions row s holds
    tokens: dict[Hashable, int]  # positions seq s counts as cached


class MlxLmCache(EngineCache):
    """Per-sequence KVCache lists, plus at most one batch (see ``_Batch``). Any
    single-sequence call on a batched sequence first takes the batch apart again,
    giving each sequence a KVCache sized to what it holds."""

    granularity = KVCache.step

    def __init__(self, model) -> None:
        self.model = model
        self.layers: dict[Hashable, list[KVCache]] = {}
        self.batch: _Batch | None = None

    def add_sequence(self, seq: Hashable) -> None:
        if seq in self.layers or (self.batch and seq in self.batch.tokens):
            raise KeyError(f"sequence {seq!r} already exists")
        self.layers[seq] = make_prompt_cache(self.model)

    def release(self, seq: Hashable) -> None:
        del self.layers[self._check(seq)]

    def fork(self, parent: Hashable, child: Hashable) -> None:
        if child in self.layers or (self.batch and child in self.batch.tokens):
            raise KeyError(f"sequence {child!r} already exists")
        copies = []
        for c in self.layers[self._check(parent)]:
            new = KVCache()
            if c.keys is not None:
                # New array objects: KVCache writes into its buffers in place.
                new.keys, new.values = mx.array(c.keys), mx.array(c.values)
            new.offset = c.offset
            copies.append(new)
        self.layers[child] = copies

    def trim(self, seq: Hashable, n: int) -> int:
        if n < 0:
            raise ValueError(f"cannot trim a negative number of tokens ({n})")
        if self.batch and seq in self.batch.tokens:
            n = min(n, self.batch.tokens[seq])
            self.batch.tokens[seq] -= n
            return n
        trimmed = {c.trim(n) for c in self.layers[self._check(seq)]}
        return trimmed.pop()

    def tokens(self, seq: Hashable) -> int:
        if self.batch and seq in self.batch.tokens:
            return self.batch.tokens[seq]
        offsets = {c.offset for c in self.layers[self._check(seq)]}
        if len(offsets) != 1:
            raise AssertionError(f"sequence {seq!r}: layers disagree on tokens cached {offsets}")
        return offsets.pop()

    def kv_bytes(self, seq: Hashable) -> int:
        return sum(c.nbytes for c in self.layers[self._check(seq)])

    def batched(self, seqs: Sequence[Hashable]) -> list[BatchKVCache]:
        """The per-layer batch caches for ``seqs``, merged from their KVCaches unless
        the current batch is these sequences with equal pending trims (a decode loop
        that rolls each step back: the benchmarks)."""
        b = self.batch
        seqs = tuple(seqs)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"a sequence appears twice in one step: {list(seqs)}")
        if b is None or b.seqs != seqs or len({b.held[s] - b.tokens[s] for s in seqs}) != 1:
            self._unbatch()
            for s in seqs:
                self._check(s)
            per_seq = [self.layers.pop(s) for s in seqs]
            layers = [BatchKVCache.merge(list(caches)) for caches in zip(*per_seq)]
            tokens = {s: c[0].offset for s, c in zip(seqs, per_seq)}
            self.batch = b = _Batch(seqs, layers, dict(tokens), dict(tokens))
        pending = b.held[seqs[0]] - b.tokens[seqs[0]]
        if pending:
            for c in b.layers:
                c.trim(pending)
            b.held = dict(b.tokens)
        return b.layers

    def _unbatch(self) -> None:
        b, self.batch = self.batch, None
        if b is None:
            return
        for i, s in enumerate(b.seqs):
            rows = [c.extract(i) if c.keys is not None else KVCache() for c in b.layers]
            for c in rows:
                c.trim(b.held[s] - b.tokens[s])
            self.layers[s] = rows

    def _check(self, seq: Hashable) -> Hashable:
        if self.batch and seq in self.batch.tokens:
            self._unbatch()
        if seq not in self.layers:
            raise KeyError(f"unknown sequence {seq!r}")
        return seq


class MlxLmEngine(Engine):
    name = "mlx-lm"

    def __init__(self, model, config: dict) -> None:
        self.model = model
        self.config = config

    @classmethod
    def load(cls, model_dir: Path, dtype: str) -> MlxLmEngine:
        """A checkpoint directory as mlx-lm loads it. mlx-lm reads no GGUF, so a GGUF
        file is first written in mlx-lm's format by ``impl.export`` (the same un-permuted,
        still quantized arrays impl runs) to a temporary directory."""
        check_dtype(dtype)
        path = Path(model_dir)
        if path.suffix != ".gguf":
            return cls._load_dir(path, dtype)
        from conform_mlx.impl.export import write_mlx_lm
        from conform_mlx.impl.loader import read_checkpoint

        with tempfile.TemporaryDirectory(prefix="conform-mlx-lm-") as tmp:
            return cls._load_dir(write_mlx_lm(read_checkpoint(path), Path(tmp)), dtype)

    @classmethod
    def _load_dir(cls, model_dir: Path, dtype: str) -> MlxLmEngine:
        model, config = load_model(model_dir)
        model.set_dtype(getattr(mx, dtype))  # floats only: packed weights stay uint32
        mx.eval(model.parameters())  # before a temporary directory goes
        return cls(model, config)

    @classmethod
    def version(cls) -> str:
        return f"mlx-lm {mlx_lm.__version__}"

    def generate(
        self, prompt: Sequence[int], max_new_tokens: int, *, eos_token_ids: Collection[int] = ()
    ) -> list[int]:
        """mlx-lm's own loop (``generate_step``: device sampling, pipelined steps), greedy."""
        out: list[int] = []
        steps = generate_step(mx.array(list(prompt)), self.model, max_tokens=max_new_tokens)
        for token, _ in steps:
            out.append(int(token))
            if out[-1] in eos_token_ids:
                break
        return out

    def weights(self) -> str:
        q = self.config.get("quantization")
        if not q:
            return "floats"
        return f"affine {q.get('bits')}-bit, group {q.get('group_size')} (mlx-lm format)"

    def new_cache(
        self, max_tokens: int, max_sequences: int = 1, block_size: int | None = None
    ) -> MlxLmCache:
        if block_size is not None:
            raise NotApplicable("unpaged cache, no block size")
        return MlxLmCache(self.model)

    def prefill(
        self,
        cache: MlxLmCache,
        seq: Hashable,
        tokens: Sequence[int],
        *,
        chunk_size: int | None = None,
        trace: Trace | None = None,
    ) -> np.ndarray:
        out = [_numpy(self._forward(cache, seq, c, trace)) for c in chunks(tokens, chunk_size)]
        return np.concatenate(out)

    def decode(
        self, cache: MlxLmCache, seq: Hashable, token: int, *, trace: Trace | None = None
    ) -> np.ndarray:
        return _numpy(self._forward(cache, seq, [token], trace))[0]

    def decode_batch(
        self, cache: MlxLmCache, seqs: Sequence[Hashable], tokens: Sequence[int]
    ) -> np.ndarray:
        return _numpy(self._forward_batch(cache, seqs, tokens))

    def run_prefill(self, cache: MlxLmCache, seq: Hashable, tokens: Sequence[int]) -> None:
        self._forward(cache, seq, list(tokens), None)

    def run_decode(
        self, cache: MlxLmCache, seqs: Sequence[Hashable], tokens: Sequence[int]
    ) -> None:
        self._forward_batch(cache, seqs, tokens)

    def fill(self, cache: MlxLmCache, seq: Hashable, n: int) -> None:
        """Random K/V through each layer's ``update_and_fetch``, as a prefill writes it."""
        if n <= 0:
            return
        args = self.model.args
        head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        shape = (1, args.num_key_value_heads, n, head_dim)  # (B, kv_heads, T, head_dim)
        dtype = self.model.model.norm.weight.dtype  # floats even when quantized
        layers = cache.layers[cache._check(seq)]
        kv = mx.random.normal(shape, key=mx.random.key(0)).astype(dtype)
        for c in layers:
            c.update_and_fetch(kv, kv)
        mx.eval([c.state for c in layers])

    def _forward(
        self, cache: MlxLmCache, seq: Hashable, ids: list[int], trace: Trace | None
    ) -> mx.array:
        """Logits (T, vocab), evaluated with the cache."""
        layers = cache.layers[cache._check(seq)]
        with _recording(self.model, trace) as step:
            logits = self.model(mx.array(ids)[None], cache=layers)  # (1, T, vocab)
            mx.eval(logits, [c.state for c in layers], step)
        if trace is not None:
            for name, value in step.items():
                trace.setdefault(name, []).append(np.array(value[0].astype(mx.float32)))
        return logits[0]

    def _forward_batch(
        self, cache: MlxLmCache, seqs: Sequence[Hashable], tokens: Sequence[int]
    ) -> mx.array:
        """Logits (B, vocab) of one token per sequence, evaluated with the cache."""
        if len(seqs) != len(tokens):
            raise ValueError(f"decode_batch: {len(seqs)} sequences but {len(tokens)} tokens")
        if len(seqs) == 1:  # mlx-lm's own single-sequence path: a KVCache, no mask
            return self._forward(cache, seqs[0], [tokens[0]], None)
        layers = cache.batched(seqs)
        logits = self.model(mx.array(list(tokens))[:, None], cache=layers)  # (B, 1, vocab)
        mx.eval(logits, [c.state for c in layers])
        for s in seqs:
            cache.batch.held[s] += 1
            cache.batch.tokens[s] += 1
        return logits[:, 0]

    def known_issue(self, model_dir: Path) -> str | None:
        """mlx-lm's ModelArgs reads `rope_theta` / `rope_scaling` at the top level only."""
        version = mlx_lm.__version__
        if version not in ROPE_PARAMETERS_IGNORED or Path(model_dir).suffix == ".gguf":
            return None  # a GGUF file reaches mlx-lm with rope_theta at the top level
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        params = raw.get("rope_parameters") or {}
        theta = params.get("rope_theta", 10000.0)
        rope_type = params.get("rope_type", "default")
        if "rope_theta" in raw or (theta == 10000.0 and rope_type == "default"):
            return None
        return (
            f"mlx-lm {version}: ignores config.json's rope_parameters (rope_type {rope_type}, "
            f"rope_theta {theta:g}) and runs RoPE with base 10000 and no scaling"
        )


def _numpy(logits: mx.array) -> np.ndarray:
    return np.array(logits.astype(mx.float32))


class _Recorder:
    """Calls the wrapped module and keeps its output (and, for layer 0, its input)."""

    def __init__(self, inner, name: str, sink: dict, input_name: str | None = None) -> None:
        self.inner, self.name, self.sink, self.input_name = inner, name, sink, input_name

    def __call__(self, x, *args, **kwargs):
        if self.input_name:
            self.sink[self.input_name] = x
        out = self.inner(x, *args, **kwargs)
        self.sink[self.name] = out
        return out

    def __getattr__(self, key: str):
        return getattr(self.inner, key)


@contextmanager
def _recording(model, trace: Trace | None) -> Iterator[dict[str, mx.array]]:
    """Recorders in front of every traced module while the block runs.

    Sub-modules get an instance attribute that shadows the module's own entry (MLX
    modules look children up in their dict only when normal lookup fails); layers
    are swapped in the model's list. Both are undone on exit.
    """
    sink: dict[str, mx.array] = {}
    if trace is None:
        yield sink
        return
    inner = model.model
    layers = list(inner.layers)
    shadowed = [(inner, "norm", _Recorder(inner.norm, "norm", sink))]
    for i, layer in enumerate(layers):
        for part in _SUBMODULES:
            shadowed.append(
                (layer, part, _Recorder(getattr(layer, part), f"layers.{i}.{part}", sink))
            )
        first = "embed_tokens" if i == 0 else None  # layer 0's input is the embedding
        inner.layers[i] = _Recorder(layer, f"layers.{i}", sink, input_name=first)
    for module, attr, recorder in shadowed:
        object.__setattr__(module, attr, recorder)
    try:
        yield sink
    finally:
        inner.layers[:] = layers
        for module, attr, _ in shadowed:
            del vars(module)[attr]


def quantize_checkpoint(src: Path, out: Path, bits: int, group_size: int) -> Path:
    """Write ``src`` (an HF float checkpoint directory) to ``out`` quantized in
    mlx-lm's format by mlx-lm's own code (affine), so a quantized model a user of
    mlx-lm would make can be judged and timed. The steps of ``mlx_lm.convert``
    without its tokenizer, which a random-weight checkpoint does not have."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, config = load_model(Path(src))
    model, config = quantize_model(model, config, group_size, bits)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(config, config_path=out / "config.json")
    return out
