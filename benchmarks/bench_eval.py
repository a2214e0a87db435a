"""Benchmark: tokens per second of scoring a long text, tokenloss vs lm-evaluation-harness vs a plain HF loop.

One model, one text, one thread count, one process; every method scores the same windows (lm-eval's
rolling windows, ``max_length`` L: the same forward passes) and the total log-likelihoods are
checked to agree. Methods:

- ``hf loop``: for each window, ``model(input_ids).logits``, ``log_softmax``, ``gather``: the
  floor any exact method pays;
- ``lm-eval bs=B``: lm-evaluation-harness's ``HFLM.loglikelihood_rolling`` in-process (when
  installed), with its tokenization and bookkeeping;
- ``tokenloss bs=B``: :func:`tokenloss.evaluation.scoring.evaluate_stream` with
  ``windows="lm-eval"``: every summary number (perplexities, bits per byte, accuracy, entropy,
  calibration), the text read in pieces;
- ``tokenloss --out bs=B``: the same, writing the per-token CSV/JSONL and the HTML report.

The methods run in interleaved rounds (order rotated each round); a row shows the median tokens/s
and its ratio to ``lm-eval bs=1`` (the harness's default batch size) measured in the same rounds.

The model is a random GPT-2 (4 layers, width 256, V = 50257, context 1024) with a byte-level BPE
tokenizer trained on the text; the text is Python's own standard-library source (no download).

Run::

    .venv/bin/python benchmarks/bench_eval.py --quick      # ~8k tokens, L = 256, one minute
    .venv/bin/python benchmarks/bench_eval.py              # ~32k tokens, L = 1024
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path


def bench_text(chars: int) -> str:
    """The first ``chars`` characters of a few standard-library modules' source."""
    import argparse as a
    import difflib
    import json.decoder
    import textwrap

    parts = [Path(module.__file__).read_text(encoding="utf-8") for module in (a, difflib, textwrap, json.decoder)]
    return "\n".join(parts)[:chars]


def build_model(directory: Path, text: str, *, vocab_size: int = 50257, context: int = 1024) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([text], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=context, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    fast.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short text and L = 256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from tokenloss.evaluation.reports import ReportWriter
    from tokenloss.evaluation.scoring import evaluate_stream
    from tokenloss.evaluation.windows import plan_windows
    from tokenloss.models import load_model

    torch.set_num_threads(args.threads)
    max_length, chars = (256, 30_000) if args.quick else (1024, 120_000)
    text = bench_text(chars)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    build_model(work / "model", text)
    lm = load_model(work / "model")
    ids = lm.encode(text)
    prefix = lm.bos_token_id

    def hf_loop(batch_size: int) -> float:
        total = 0.0
        with torch.inference_mode():
            for w in plan_windows(len(ids), max_length=max_length, stride=1, bos=True, scheme="lm-eval"):
                inputs = torch.tensor([([prefix] if w.prefix else []) + ids[w.begin : w.end]])
                log_p = torch.log_softmax(lm.model(input_ids=inputs).logits[0].float(), -1)
                rows = log_p[w.score_from - w.begin + w.prefix - 1 : w.score_to - w.begin + w.prefix - 1]
                total += float(rows.gather(-1, torch.tensor(ids[w.score_from : w.score_to])[:, None]).sum())
        return total

    def ours(batch_size: int, out: bool = False) -> float:
        def run(sink):
            return evaluate_stream(
                lm, [text], windows="lm-eval", max_length=max_length, batch_size=batch_size, sink=sink
            )

        if out:
            with ReportWriter(work / "report", plot=False) as writer:
                result = run(writer).result
                writer.finish(result, vocab_size=lm.vocab_size)
        else:
            result = run(None).result
        return -result["loss_nats"] * result["tokens"]

    methods = {"hf loop": lambda: hf_loop(1)}
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        for batch in (1, 8):
            harness = HFLM(
                pretrained=str(work / "model"), max_length=max_length, batch_size=batch, device="cpu",
                dtype="float32", add_bos_token=False,
            )  # fmt: skip
            request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
            methods[f"lm-eval bs={batch}"] = lambda h=harness, r=request: h.loglikelihood_rolling([r], True)[0]
    except ImportError as error:
        print(f"lm-eval not installed ({error}): its rows are skipped")
    for batch in (1, 8):
        methods[f"tokenloss bs={batch}"] = lambda b=batch: ours(b)
    for batch in (1, 8):
        methods[f"tokenloss --out bs={batch}"] = lambda b=batch: ours(b, out=True)
    torch.set_num_threads(args.threads)  # HFLM may change it

    names = list(methods)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    totals: dict[str, float] = {}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            totals[name] = methods[name]()
            if round_index:
                seconds[name].append(time.perf_counter() - start)
    reference = totals["hf loop"]
    baseline = "lm-eval bs=1" if "lm-eval bs=1" in seconds else "hf loop"
    print(
        f"\n{len(ids)} tokens, lm-eval windows of L = {max_length}, GPT-2 4x256 V=50257, float32, "
        f"{args.threads} threads, median of {args.rounds} rounds\n"
    )
    print(f"| method | tokens/s | x {baseline} | log-likelihood | rel. diff vs hf loop |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        ratios = [b / s for s, b in zip(seconds[name], seconds[baseline])]
        rate = len(ids) / statistics.median(seconds[name])
        diff = abs(totals[name] - reference) / abs(reference)
        print(f"| {name} | {rate:,.0f} | {statistics.median(ratios):.2f} | {totals[name]:.4f} | {diff:.1e} |")
        assert math.isfinite(totals[name]) and diff < 1e-5, f"{name} disagrees with the hf loop"


if __name__ == "__main__":
    main()
