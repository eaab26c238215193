"""Train the tiny *trained* Llama (GQA 8:2) reference checkpoint on CPU.

Randomly initialised models have near-flat next-token distributions, so greedy
decoding comparisons between implementations flip on rounding noise. This
script trains a ~0.8M-parameter Llama for a few minutes on the structured text
from ``reference.corpus`` so its predictions are peaked, then writes a
self-contained HF checkpoint (float32 ``model.safetensors`` + tokenizer).

Deterministic: fixed seeds, ``torch.use_deterministic_algorithms(True)`` and a
fixed thread count, so re-running with the same arguments on the same machine
reproduces ``model.safetensors`` byte for byte.

Usage: ``python -m reference.train_tiny [--out DIR] [--steps N] [--seed S]``
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conform_mlx.reference.checkpoints import out_dir_error, seed_arg
from conform_mlx.reference.corpus import make_corpus

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama
VOCAB_SIZE = 512
SEQ_LEN = 128
BATCH = 32
LOG_EVERY = 25


def train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Llama's special-token ids; encoding prepends ``<s>``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    # Prepend BOS like Llama tokenizers do, so HF `tokenizer(prompt)` matches training.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def encode_plain(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """Token ids of a long text without BOS (the backend skips HF's max-length warning)."""
    return torch.tensor(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)


def build_model(vocab_size: int) -> LlamaForCausalLM:
    """The fixed tiny GQA architecture (8 query heads sharing 2 KV heads)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(torch.float32)


def sample_batch(ids: torch.Tensor, starts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """BOS + (SEQ_LEN - 1) corpus tokens starting at random line starts."""
    pick = starts[torch.randint(len(starts), (BATCH,), generator=gen)]
    rows = torch.stack([ids[s : s + SEQ_LEN - 1] for s in pick.tolist()])
    bos = torch.full((BATCH, 1), 1, dtype=torch.long)
    return torch.cat([bos, rows], dim=1)


def logit_margin(model: LlamaForCausalLM, batch: torch.Tensor) -> float:
    """Mean top-1 minus top-2 logit over every position of ``batch``."""
    with torch.no_grad():
        top2 = model(input_ids=batch).logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).mean().item()


def positive_int(text: str) -> int:
    """argparse type for --steps: zero steps would divide by zero in the LR schedule."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants an integer, got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="conform train-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="checkpoints/tiny-gqa", help="output directory")
    parser.add_argument("--steps", type=positive_int, default=600, help="optimizer steps")
    parser.add_argument(
        "--seed", type=seed_arg, default=0, help="seed for corpus, init and batches"
    )
    args = parser.parse_args(argv)
    error = out_dir_error(Path(args.out))  # before minutes of training, not after
    if error:
        parser.error(f"--out {error}")

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)  # reduction order depends on the thread count

    text = make_corpus(num_chars=1_000_000, seed=args.seed)
    tokenizer = train_tokenizer(text)
    ids = encode_plain(tokenizer, text)
    newline = tokenizer.convert_tokens_to_ids("Ċ")  # byte-level spelling of "\n"
    starts = (ids == newline).nonzero().flatten() + 1
    starts = starts[starts < len(ids) - SEQ_LEN]
    print(f"corpus: {len(text)} chars, {len(ids)} tokens, vocab {len(tokenizer)}")

    model = build_model(len(tokenizer))
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
        ),
    )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(1, args.steps + 1):
        batch = sample_batch(ids, starts, gen)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % LOG_EVERY == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)", flush=True)
    final_loss = loss.item()
    wall = time.time() - t0

    out = Path(args.out)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "TRAINING.md").write_text(
        "# tiny-gqa training record\n\n"
        f"- command: `python -m reference.train_tiny --out {args.out} --steps {args.steps}"
        f" --seed {args.seed}`\n"
        f"- seed: {args.seed}\n- steps: {args.steps} (batch {BATCH} x {SEQ_LEN} tokens)\n"
        f"- final training loss: {final_loss:.4f} nats/token\n"
        f"- wall time: {wall:.0f} s\n- date: 2026-11-27\n- machine: 2-core x86-64 CPU\n"
    )

    prompt = tokenizer("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        gen_ids = model.generate(
            **prompt, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    print("greedy:", repr(tokenizer.decode(gen_ids[0], skip_special_tokens=True)))
    # Held-out text: same generator, different seed, so not seen in training.
    held = make_corpus(num_chars=20_000, seed=args.seed + 1000)
    held_ids = encode_plain(tokenizer, held)
    held_batch = sample_batch(held_ids, torch.arange(0, len(held_ids) - SEQ_LEN, 97), gen)
    print(
        f"final loss {final_loss:.4f}  wall {wall:.0f}s  "
        f"held-out top1-top2 logit margin {logit_margin(model, held_batch):.3f}"
    )


if __name__ == "__main__":
    main()
