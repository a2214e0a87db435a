"""Benchmark: peak memory of one training step of a small Hugging Face causal LM at V = 128k, before/after patch.

Each row builds a small random model from a config (2 layers, hidden size 256, a 128256-word
vocabulary: the vocabulary is the only big thing, as in a real LM's head at a short context) in a
fresh process and runs an AdamW training step (forward with ``labels=input_ids``, backward,
``optimizer.step()``) on ``batch x seq`` random tokens on the CPU, its loss computed by:

- ``transformers``: the model's own forward (the ``(B, T, V)`` logits, then the loss);
- ``tokenloss``: ``tokenloss.integrations.transformers.patch``;
- ``TRL head``: TRL's own fused LM head (``trl.trainer.utils.add_fused_lm_head``, called with
  ``fused_lm_head=True`` as its trainers do; loss = its mean negative log-likelihood);
- ``TRL + tokenloss``: the same call with ``tokenloss.integrations.trl.patch_trainer``;

each in float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (``--precision``). After
one warm-up step (so that the optimizer's state exists), the process's peak resident set (``VmHWM``) is reset through
``/proc/self/clear_refs`` (Linux >= 4.0) and one more step runs; the table gives the growth of the
peak over the resident set before the step, i.e. the activations, logits and gradients the step
needs, and the step's wall time (on a shared CPU: indicative only). The two rows of a family start
from the same weights and batch, so their losses agree to float32 rounding.

Run (the unpatched rows need several GiB, so take the machine's heavy-job lock)::

    flock /tmp/tokenloss-heavy.lock .venv/bin/python benchmarks/bench_transformers_memory.py
    .venv/bin/python benchmarks/bench_transformers_memory.py --quick      # V = 32000, batch 2 x 256
    .venv/bin/python benchmarks/bench_transformers_memory.py --families llama --modes all --precision all
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _memory import peak_rss_bytes, reset_peak

MIB = 1 << 20
FAMILIES = ("gpt2", "llama", "qwen2", "gemma2")
MODES = {"transformers": "transformers", "tokenloss": "tokenloss patch", "trl": "TRL head",
         "trl+tokenloss": "TRL head + tokenloss"}  # fmt: skip
PRECISIONS = ("float32", "bf16-autocast")


def build_model(family: str, vocab: int, seq: int):
    """A 2-layer random causal LM of ``family``, hidden size 256, vocabulary ``vocab``, no dropout."""
    import transformers

    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_embd=256, n_layer=2, n_head=4, n_positions=seq, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    common = dict(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if family == "gemma2":  # final_logit_softcapping = 30.0, the config's default
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, head_dim=64))
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def worker(family: str, mode: str, precision: str, vocab: int, batch: int, seq: int) -> dict:
    """One row, in this (fresh) process: the step's peak RSS growth, time and loss."""
    import contextlib

    import torch

    torch.manual_seed(0)
    model = build_model(family, vocab, seq).train()
    fused = mode in ("trl", "trl+tokenloss")
    if mode == "tokenloss":
        from tokenloss.integrations.transformers import patch

        patch(model)
    if fused:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    if mode == "trl+tokenloss":
        from types import SimpleNamespace

        from tokenloss.integrations.trl import patch_trainer

        patch_trainer(SimpleNamespace(model=model, ref_model=None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast" else contextlib.nullcontext()

    def step() -> float:
        with autocast:
            outputs = model(input_ids=input_ids, labels=input_ids, **({"fused_lm_head": True} if fused else {}))
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return outputs.loss.item()

    step()  # warm-up: creates the optimizer state
    base = reset_peak()
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    return dict(peak=peak_rss_bytes() - base, seconds=seconds, loss=loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {FAMILIES}")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="V = 32000, batch 2 x 256")
    parser.add_argument(
        "--modes", default="transformers,tokenloss", help=f"comma-separated from {tuple(MODES)}, or all"
    )
    parser.add_argument("--precision", default="float32", help=f"comma-separated from {PRECISIONS}, or all")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON arguments of one row, run in a fresh process
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    if args.quick:
        args.vocab, args.batch, args.seq = 32000, 2, 256
    modes = tuple(MODES) if args.modes == "all" else tuple(args.modes.split(","))
    precisions = PRECISIONS if args.precision == "all" else tuple(args.precision.split(","))

    logits_mib = args.batch * args.seq * args.vocab * 4 / MIB
    print(
        f"V = {args.vocab}, batch {args.batch} x seq {args.seq}, hidden 256, 2 layers, AdamW, CPU; "
        f"the (B, T, V) float32 logits alone are {logits_mib:.0f} MiB\n"
    )
    print("| model | precision | loss computed by | step peak (MiB) | step time (s) | loss | peak / transformers' |")
    print("|---|---|---|---:|---:|---:|---:|")
    for family in args.families.split(","):
        for precision in precisions:
            first = None
            for mode in modes:
                row_args = dict(family=family, mode=mode, precision=precision, vocab=args.vocab, batch=args.batch,
                                seq=args.seq)  # fmt: skip
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(row_args)], capture_output=True, text=True,
                    check=True,
                )  # fmt: skip
                row = json.loads(out.stdout.strip().splitlines()[-1])
                first = first or row
                print(
                    f"| {family} | {precision} | {MODES[mode]} | {row['peak'] / MIB:.0f} | {row['seconds']:.2f} | "
                    f"{row['loss']:.5f} | {row['peak'] / max(first['peak'], 1):.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
