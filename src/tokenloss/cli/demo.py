"""``tokenloss demo``: the worked examples of the loss, a uniform guess, the gradient and one benchmark row.

Every number is computed by :func:`tokenloss.cross_entropy` (nothing is hard-coded but the
probabilities of the examples), so the demo doubles as a smoke test of an installation. It
prints in a few seconds; the benchmark row, the only part that takes time, is opt-in (``--bench``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from typing import Annotated

import typer

from tokenloss.cli.errors import CLIError

EXAMPLES = """
Examples:

  tokenloss demo                        # the worked examples (a few seconds)

  tokenloss demo --json                 # one JSON object

  tokenloss demo --bench                # plus one benchmark row at 2048x32000 (about half a minute)

  tokenloss demo --bench-size 8192x32000 --repeats 5
"""

WORKED_PROBABILITIES = (0.99, 0.95, 0.9, 0.7, 0.5, 0.05, 0.001)
SENTENCE = (("The", 0.02), ("quick", 0.15), ("brown", 0.40), ("fox", 0.60))
UNIFORM_VOCABULARIES = (5, 256, 32000, 128256)
GRADIENT_LOGITS = (2.0, 1.0, 0.1, -1.0)
GRADIENT_TARGET = 0
DEFAULT_BENCH_SIZE = "2048x32000"


def _two_class_logits(probabilities):
    """``(n, 2)`` float32 logits ``[log p, log(1 - p)]``: class 0 has probability p."""
    import torch

    p = torch.tensor(probabilities, dtype=torch.float64)
    return torch.stack([p.log(), torch.log1p(-p)], dim=-1).float()


def worked_examples() -> list[dict]:
    """The loss of a target predicted with probability p, for :data:`WORKED_PROBABILITIES`."""
    import torch

    import tokenloss as tl

    logits = _two_class_logits(WORKED_PROBABILITIES)
    losses = tl.cross_entropy(logits, torch.zeros(len(WORKED_PROBABILITIES), dtype=torch.long), reduction="none")
    return [
        {"p": p, "loss_nats": loss, "loss_bits": loss / math.log(2)}
        for p, loss in zip(WORKED_PROBABILITIES, losses.tolist())
    ]


def sentence_example() -> dict:
    """The four positions of "The quick brown fox", their losses, mean, bits and perplexity."""
    import torch

    import tokenloss as tl

    words = [word for word, _ in SENTENCE]
    logits = _two_class_logits([p for _, p in SENTENCE])
    targets = torch.zeros(len(SENTENCE), dtype=torch.long)
    losses = tl.cross_entropy(logits, targets, reduction="none").tolist()
    mean = tl.cross_entropy(logits, targets).item()
    return {
        "tokens": [{"word": w, "p": p, "loss_nats": loss} for w, (_, p), loss in zip(words, SENTENCE, losses)],
        "mean_nats": mean,
        "mean_bits": mean / math.log(2),
        "perplexity": math.exp(mean),
    }


def uniform_examples() -> list[dict]:
    """The loss of a uniform guess (all logits equal) over V classes: log V nats, perplexity V."""
    import torch

    import tokenloss as tl

    rows = []
    for vocab_size in UNIFORM_VOCABULARIES:
        loss = tl.cross_entropy(torch.zeros(1, vocab_size), torch.tensor([vocab_size - 1])).item()
        rows.append(
            {
                "V": vocab_size,
                "loss_nats": loss,
                "log_V": math.log(vocab_size),
                "loss_bits": loss / math.log(2),
                "perplexity": math.exp(loss),
            }
        )
    return rows


def gradient_example() -> dict:
    """The gradient of the loss of :data:`GRADIENT_LOGITS` with target :data:`GRADIENT_TARGET`, by autograd,
    next to ``softmax - onehot``."""
    import torch

    import tokenloss as tl

    logits = torch.tensor([GRADIENT_LOGITS], requires_grad=True)
    tl.cross_entropy(logits, torch.tensor([GRADIENT_TARGET])).backward()
    softmax = torch.softmax(logits.detach(), dim=-1)[0]
    onehot = torch.nn.functional.one_hot(torch.tensor(GRADIENT_TARGET), len(GRADIENT_LOGITS)).float()
    return {
        "logits": list(GRADIENT_LOGITS),
        "target": GRADIENT_TARGET,
        "softmax": softmax.tolist(),
        "onehot": onehot.tolist(),
        "softmax_minus_onehot": (softmax - onehot).tolist(),
        "autograd": logits.grad[0].tolist(),
    }


def benchmark_row(n_rows: int, vocab_size: int, repeats: int) -> dict:
    """Median time of forward+backward, tokenloss vs ``F.cross_entropy`` on ``(n_rows, vocab_size)``
    float32 logits, timed in interleaved rounds (after a small warm-up) so the ratio is side by side."""
    import torch
    import torch.nn.functional as F

    import tokenloss as tl

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n_rows, vocab_size, generator=gen).mul_(4.0).requires_grad_()  # (N, V)
    targets = torch.randint(0, vocab_size, (n_rows,), generator=gen)  # (N,)
    functions = {"tokenloss": tl.cross_entropy, "torch": F.cross_entropy}
    for function in functions.values():  # warm-up on a few rows: thread pool, lazy initialisation
        function(logits[:8], targets[:8]).backward()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            logits.grad = None
            start = time.perf_counter()
            function(logits, targets).backward()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "N": n_rows,
        "V": vocab_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "tokenloss_ms": medians["tokenloss"] * 1e3,
        "torch_ms": medians["torch"] * 1e3,
        "speedup": medians["torch"] / medians["tokenloss"],
    }


def run_demo(bench_size: tuple[int, int] | None, repeats: int) -> dict:
    """Everything ``tokenloss demo`` shows, as one JSON-ready dict (no benchmark when ``bench_size`` is None)."""
    return {
        "worked_examples": worked_examples(),
        "sentence": sentence_example(),
        "uniform": uniform_examples(),
        "gradient": gradient_example(),
        "benchmark": None if bench_size is None else benchmark_row(*bench_size, repeats=repeats),
    }


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: left-aligned first column, right-aligned numbers."""
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join(["  " + line(headers), "  " + "  ".join("-" * w for w in widths)] + ["  " + line(r) for r in rows])


def format_demo(result: dict) -> str:
    """The human-readable demo: one titled table per part."""
    parts = [
        "What one prediction costs: the loss of the right token is -log p (natural log: nats)",
        _table(
            ["p(right token)", "loss (nats)", "loss (bits)"],
            [[f"{r['p']:g}", f"{r['loss_nats']:.3f}", f"{r['loss_bits']:.3f}"] for r in result["worked_examples"]],
        ),
        "",
        '"The quick brown fox": the loss of a text is the mean over its tokens',
        _table(
            ["token", "p", "loss (nats)"],
            [[t["word"], f"{t['p']:.2f}", f"{t['loss_nats']:.2f}"] for t in result["sentence"]["tokens"]],
        ),
        # The perplexity is shown with the mean it is computed from (exp(1.81) would be 6.11, not 6.10).
        f"  mean {result['sentence']['mean_nats']:.4f} nats = {result['sentence']['mean_bits']:.4f} bits per token;"
        f" perplexity exp({result['sentence']['mean_nats']:.4f}) = {result['sentence']['perplexity']:.2f}",
        "",
        "A uniform guess over V tokens (all logits equal) costs log V: the loss of an untrained model",
        _table(
            ["V", "loss (nats)", "log V", "bits", "perplexity"],
            [
                [
                    f"{r['V']}",
                    f"{r['loss_nats']:.3f}",
                    f"{r['log_V']:.3f}",
                    f"{r['loss_bits']:.2f}",
                    f"{r['perplexity']:,.0f}",
                ]
                for r in result["uniform"]
            ],
        ),
        "",
        "The gradient of the loss w.r.t. the logits is softmax - onehot "
        f"(target = class {result['gradient']['target']})",
        _table(
            ["class", "logit", "softmax", "onehot", "softmax - onehot", "autograd"],
            [
                [str(i), f"{x:g}", f"{s:.4f}", f"{o:g}", f"{d:+.4f}", f"{a:+.4f}"]
                for i, (x, s, o, d, a) in enumerate(
                    zip(
                        *(
                            result["gradient"][k]
                            for k in ("logits", "softmax", "onehot", "softmax_minus_onehot", "autograd")
                        )
                    )
                )
            ],
        ),
    ]
    bench = result["benchmark"]
    if bench is not None:
        parts += [
            "",
            f"Forward+backward on ({bench['N']}, {bench['V']}) float32 logits, CPU, {bench['threads']} thread(s),"
            f" median of {bench['repeats']} interleaved rounds",
            _table(
                ["implementation", "time (ms)", "speed-up"],
                [
                    ["tokenloss.cross_entropy", f"{bench['tokenloss_ms']:,.0f}", f"{bench['speedup']:.2f}x"],
                    ["torch.nn.functional.cross_entropy", f"{bench['torch_ms']:,.0f}", "1.00x"],
                ],
            ),
        ]
    return "\n".join(parts)


def parse_size(text: str) -> tuple[int, int]:
    """``"2048x32000"`` -> ``(2048, 32000)``.

    Raises:
        CLIError: not two positive integers joined by ``x``.
    """
    try:
        n_rows, vocab_size = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise CLIError(f"--bench-size must be NxV with two positive integers, e.g. 2048x32000; got {text!r}") from None
    if n_rows < 1 or vocab_size < 1:
        raise CLIError(f"--bench-size must be NxV with two positive integers, e.g. 2048x32000; got {text!r}")
    return n_rows, vocab_size


def register(app: typer.Typer) -> None:
    """Adds the ``demo`` command to ``app``."""

    @app.command(
        "demo",
        help="The cross-entropy loss by example: -log p, a sentence's mean loss and perplexity, the log V of a "
        "uniform guess, the gradient softmax - onehot; with --bench, tokenloss vs F.cross_entropy on one "
        "benchmark row.",
        epilog=EXAMPLES,
    )
    def demo_command(
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
        bench_size: Annotated[
            str | None,
            typer.Option(
                "--bench-size",
                help="N x V of the benchmark row's float32 logits (implies --bench).",
                show_default="2048x32000",
            ),
        ] = None,
        repeats: Annotated[int, typer.Option("--repeats", help="Timed rounds of the benchmark (median).")] = 3,
        bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Run the benchmark row (opt-in).")] = False,
    ) -> None:
        run_bench = bench or bench_size is not None
        size = parse_size(bench_size or DEFAULT_BENCH_SIZE) if run_bench else None
        if repeats < 1:
            raise CLIError(f"--repeats must be >= 1, got {repeats}")
        result = run_demo(size, repeats)
        print(json.dumps(result) if as_json else format_demo(result))
