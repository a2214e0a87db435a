"""Benchmark: per-token log-probs + entropy (RL fine-tuning) and distillation, fused vs from full logits.

``--task logprobs`` (the default). Inputs: ``hidden`` ``(N, D)`` and ``weight`` ``(V, D)`` float32
requiring grad, sampled tokens, and independent upstream gradients for ``logp`` and ``entropy`` (a
policy-gradient term and an entropy bonus). Methods:

- ``naive``: full logits, ``log_softmax``, ``gather`` and ``-(p * log p).sum(-1)`` (the way TRL's
  ``selective_log_softmax`` and most RL trainers compute them), then autograd;
- ``compiled``: the same function under ``torch.compile`` (compiled in the warm-up round);
- ``floor``: the three matrix products any exact method needs (logits, grad_hidden, grad_weight);
- ``tokenloss``: :func:`tokenloss.linear_token_logprobs` (its backward recomputes each chunk's
  logits, a fourth product, because the upstream gradients are known only then).

``--task distillation``: forward KL(teacher || student) between a frozen teacher's head over its
own hidden states (``(N, D)``, the same D) and the student's, gradients for the student only.
``naive`` builds both ``(N, V)`` logits, ``log_softmax`` of each and the KL, then autograd;
``compiled`` is it under ``torch.compile``; ``floor`` the four products any exact method needs (the
teacher's logits, the student's, grad_hidden, grad_weight); ``tokenloss`` is
:func:`tokenloss.linear_distillation_loss` (the mean's gradients computed in the forward pass: the
same four products, chunk by chunk). ``--task jsd``: the same with the generalised Jensen-Shannon
divergence at ``beta = 0.5`` (TRL's GKD default), ``naive`` written as TRL's ``generalized_jsd_loss``
(``logsumexp`` of the stacked log-probabilities for the mixture, two ``kl_div``).

Time: one process per shape runs the methods in interleaved rounds (order rotated each round);
``x floor`` is the median over rounds of a method's time over the floor's in the same round.
Memory: each (shape, method) runs one step in a fresh process; the peak RSS growth of the step,
minus the gradients every method returns (grad_hidden and grad_weight).

Run::

    .venv/bin/python benchmarks/bench_logprobs.py --quick                 # 1024x256x8000, a minute
    .venv/bin/python benchmarks/bench_logprobs.py                         # (4096, 512, 32000), (2048, 1024, 128256)
    .venv/bin/python benchmarks/bench_logprobs.py --task distillation --shapes 4096x512x32000
    .venv/bin/python benchmarks/bench_logprobs.py --task jsd --shapes 4096x512x32000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _memory import peak_rss_bytes, reset_peak  # beside this script

DEFAULT_SHAPES = ("4096x512x32000", "2048x1024x128256")
QUICK_SHAPES = ("1024x256x8000",)
METHODS = ("naive", "compiled", "floor", "tokenloss")


def _naive(hidden, weight, tokens):
    import torch

    logits = hidden @ weight.T  # (N, V)
    log_p = torch.log_softmax(logits, dim=-1)
    logp = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy


def _naive_distillation(hidden, weight, teacher_hidden, teacher_weight):
    import torch

    student = torch.log_softmax(hidden @ weight.T, dim=-1)  # (N, V)
    with torch.no_grad():
        teacher = torch.log_softmax(teacher_hidden @ teacher_weight.T, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _naive_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=0.5):
    import math

    import torch
    import torch.nn.functional as F

    student = torch.log_softmax(hidden @ weight.T, dim=-1)  # (N, V)
    with torch.no_grad():
        teacher = torch.log_softmax(teacher_hidden @ teacher_weight.T, dim=-1)
    mixture = torch.logsumexp(torch.stack([student + math.log(1 - beta), teacher + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(mixture, teacher, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, student, reduction="none", log_target=True)
    return (beta * kl_teacher + (1 - beta) * kl_student).sum() / hidden.shape[0]


def _distillation_step(method: str, divergence: str = "forward_kl"):
    """``step(hidden, weight, teacher_hidden, teacher_weight)``: one forward and backward of the mean
    ``divergence`` (``"forward_kl"`` or ``"jsd"`` at beta 0.5)."""
    import torch

    if method == "floor":

        def step(hidden, weight, teacher_hidden, teacher_weight):
            with torch.no_grad():
                teacher_hidden @ teacher_weight.T
                logits = hidden @ weight.T
                hidden.grad = logits @ weight
                weight.grad = logits.T @ hidden

        return step
    if method == "tokenloss":
        import tokenloss as tl

        def fn(hidden, weight, teacher_hidden, teacher_weight):
            return tl.linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, divergence=divergence)

    elif method == "compiled":
        fn = torch.compile(_naive_jsd if divergence == "jsd" else _naive_distillation)
    else:
        fn = _naive_jsd if divergence == "jsd" else _naive_distillation

    def step(hidden, weight, teacher_hidden, teacher_weight):
        fn(hidden, weight, teacher_hidden, teacher_weight).backward()

    return step


def _step(method: str, task: str = "logprobs"):
    """``step(hidden, weight, tokens, g, h)``: one forward and backward of ``g * logp + h * entropy``
    (``task="distillation"``: see :func:`_distillation_step`)."""
    import torch

    if task in ("distillation", "jsd"):
        return _distillation_step(method, "jsd" if task == "jsd" else "forward_kl")

    if method == "floor":

        def step(hidden, weight, tokens, g, h):
            with torch.no_grad():
                logits = hidden @ weight.T
                hidden.grad = logits @ weight
                weight.grad = logits.T @ hidden

        return step
    if method == "tokenloss":
        import tokenloss as tl

        def fn(hidden, weight, tokens):
            return tl.linear_token_logprobs(hidden, weight, tokens)

    elif method == "compiled":
        fn = torch.compile(_naive)
    else:
        fn = _naive

    def step(hidden, weight, tokens, g, h):
        logp, entropy = fn(hidden, weight, tokens)
        ((logp * g).sum() + (entropy * h).sum()).backward()

    return step


def _inputs(n: int, d: int, v: int, task: str = "logprobs"):
    import torch

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) * d**-0.5).requires_grad_()
    if task in ("distillation", "jsd"):  # a frozen teacher: its hidden states and head need no gradient
        return hidden, weight, torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen) * d**-0.5
    tokens = torch.randint(0, v, (n,), generator=gen)
    g, h = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.01
    return hidden, weight, tokens, g, h


def time_worker(shape: str, repeats: int, threads: int, task: str = "logprobs") -> dict:
    import torch

    torch.set_num_threads(threads)
    n, d, v = (int(x) for x in shape.split("x"))
    inputs = _inputs(n, d, v, task)
    steps = {m: _step(m, task) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for round_index in range(repeats + 1):  # round 0 warms up (and compiles)
        order = METHODS[round_index % len(METHODS) :] + METHODS[: round_index % len(METHODS)]
        for method in order:
            inputs[0].grad = inputs[1].grad = None
            start = time.perf_counter()
            steps[method](*inputs)
            if round_index:
                times[method].append(time.perf_counter() - start)
    return times


def memory_worker(shape: str, method: str, threads: int, task: str = "logprobs") -> float:
    import torch

    torch.set_num_threads(threads)
    n, d, v = (int(x) for x in shape.split("x"))
    inputs = _inputs(n, d, v, task)
    step = _step(method, task)
    if method == "compiled":
        step(*inputs)  # compile outside the measured step
        inputs[0].grad = inputs[1].grad = None
    before = reset_peak()
    step(*inputs)
    grads = sum(t.grad.numel() * 4 for t in inputs[:2] if t.grad is not None)
    return (peak_rss_bytes() - before - grads) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None, help="NxDxV")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPES[0]}, 3 rounds")
    parser.add_argument("--task", choices=("logprobs", "distillation", "jsd"), default="logprobs")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, shape, *rest = args.worker
        if kind == "time":
            print(json.dumps(time_worker(shape, int(rest[0]), args.threads, args.task)))
        else:
            print(json.dumps(memory_worker(shape, rest[0], args.threads, args.task)))
        return
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    repeats = 3 if args.quick else args.repeats

    def run(*worker: str) -> object:
        command = [sys.executable, __file__, "--threads", str(args.threads), "--task", args.task, "--worker", *worker]
        return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    print(
        f"{args.task}: float32 CPU, {args.threads} threads, {repeats} interleaved rounds; "
        "memory: peak growth minus gradients"
    )
    print("| (N, D, V) | method | median s | x floor (min-max) | peak extra memory | x naive |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in shapes:
        times = run("time", shape, str(repeats))
        memory = {m: run("memory", shape, m) for m in METHODS}
        for method in METHODS:
            ratios = [t / f for t, f in zip(times[method], times["floor"])]
            print(
                f"| ({shape.replace('x', ', ')}) | {method} | {statistics.median(times[method]):.2f} | "
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{memory[method]:,.0f} MiB | {memory[method] / max(memory['naive'], 1e-9):.2f} |"
            )


if __name__ == "__main__":
    main()
