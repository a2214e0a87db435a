"""Test vectors from the Python library, for checking that the explain page's JavaScript math agrees with it.

:func:`generate_vectors` feeds a fixed set of cases (uniform, ties, V = 1, logits of +-50 and
+-1000, a 256-word vocabulary, padding with ``ignore_index``, the worked sentence) to
:func:`tokenloss.cross_entropy` and returns inputs and outputs as plain JSON-ready numbers. The
browser tests run ``window.tokenlossMath`` on the same inputs and compare. ``python -m
tokenloss.explain.vectors`` prints them as JSON.
"""

from __future__ import annotations

import json
import math
import sys

import torch

import tokenloss
from tokenloss.evaluation.formatting import format_vectors

# (name, logits, targets): each target is scored against the same row of logits.
_FIXED_ROWS: tuple[tuple[str, list[float], tuple[int, ...]], ...] = (
    ("uniform V=6", [0.0] * 6, (0, 5)),
    ("single word V=1", [3.0], (0,)),
    ("ties", [2.0, 2.0, 2.0, -1.0], (1, 3)),
    ("logits of +-50", [50.0, -50.0, 0.0, 49.5, -49.5, 10.0], (0, 1, 3)),
    ("logits of +-1000", [1000.0, -1000.0, 999.0, 0.0], (0, 1, 2, 3)),
    ("all very negative", [-1000.0, -1001.0, -999.5], (0, 1)),
)

# (name, V, scale, number of rows) of random rows, drawn from a fixed seed.
_RANDOM_ROWS: tuple[tuple[str, int, float, int], ...] = (
    ("random V=6 scale 3", 6, 3.0, 3),
    ("random V=11 scale 10", 11, 10.0, 2),
    ("random V=256 scale 5", 256, 5.0, 1),
)

# The worked example of the page: "The quick brown fox" with p = 0.02, 0.15, 0.40, 0.60.
WORKED_SENTENCE_PROBS = (0.02, 0.15, 0.40, 0.60)


def _floats(tensor: torch.Tensor) -> list[float]:
    return [float(x) for x in tensor.reshape(-1).tolist()]


def _row_case(name: str, logits: torch.Tensor, target: int) -> dict:
    """One row through tokenloss: loss, logsumexp, softmax and gradient (autograd of the library's loss)."""
    row = logits.detach().clone().reshape(1, -1).requires_grad_(True)  # (1, V) float32
    loss = tokenloss.cross_entropy(row, torch.tensor([target]), reduction="sum")
    (grad,) = torch.autograd.grad(loss, row)
    lse = float(loss.detach()) + float(logits[target])
    return {
        "name": name,
        "logits": _floats(logits),
        "target": target,
        "loss": float(loss.detach()),
        "logsumexp": lse,
        "softmax": _floats(torch.softmax(logits.double(), dim=-1)),
        "gradient": _floats(grad),
    }


def _batch_case(name: str, rows: torch.Tensor, targets: list[int], ignore_index: int) -> dict:
    loss = tokenloss.cross_entropy(rows, torch.tensor(targets), ignore_index=ignore_index)
    return {
        "name": name,
        "rows": [_floats(r) for r in rows],
        "targets": targets,
        "ignore_index": ignore_index,
        "mean_loss": float(loss),
    }


def _probs_case(name: str, probs: tuple[float, ...]) -> dict:
    """A sentence given by the probability of each right token: rows of logits ``[log p, log(1 - p)]``."""
    logits = torch.tensor([[math.log(p), math.log1p(-p)] for p in probs], dtype=torch.float64).float()
    per_token = tokenloss.cross_entropy(logits, torch.zeros(len(probs), dtype=torch.long), reduction="none")
    return {
        "name": name,
        "probs": list(probs),
        "losses": _floats(per_token),
        "mean_loss": float(per_token.mean()),
    }


def generate_vectors(seed: int = 0) -> dict:
    """The cases and the library's answers, as JSON-ready lists of floats.

    Args:
        seed: seed of the random rows.

    Returns:
        ``{"rows": [...], "batches": [...], "sentences": [...], "formats": [...]}``. A row holds ``logits`` (V floats,
        exactly representable in float32), ``target``, and tokenloss's ``loss`` (nats, float32
        precision), ``logsumexp``, ``softmax`` (float64) and ``gradient`` (``softmax - onehot``,
        float32). A batch holds ``rows``, ``targets``, ``ignore_index`` and the ``mean_loss`` over
        counted rows (0.0 if none counts). A sentence holds ``probs``, per-token ``losses`` and
        ``mean_loss``. ``formats`` holds ``value``, ``digits`` and the ``text`` of
        :func:`tokenloss.evaluation.formatting.format_number`. ``knobs`` holds rows through label
        smoothing, focal loss and temperature (:func:`_knob_case`).
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for name, values, targets in _FIXED_ROWS:
        logits = torch.tensor(values, dtype=torch.float32)
        rows += [_row_case(name, logits, t) for t in targets]
    for name, vocab, scale, count in _RANDOM_ROWS:
        for _ in range(count):
            logits = torch.randn(vocab, generator=generator) * scale
            target = int(torch.randint(vocab, (1,), generator=generator))
            rows.append(_row_case(name, logits, target))

    padded = torch.randn(5, 6, generator=generator) * 2
    batches = [
        _batch_case("padding ignored with -100", padded, [1, 4, -100, -100, 0], -100),
        _batch_case("ignore_index=5", padded, [5, 2, 5, 3, 1], 5),
        _batch_case("nothing counts", padded[:2], [-100, -100], -100),
        _batch_case("logits of +-50 in a batch", torch.tensor([[50.0, -50.0], [-50.0, 50.0]]), [1, 1], -100),
    ]
    sentences = [
        _probs_case("The quick brown fox", WORKED_SENTENCE_PROBS),
        _probs_case("the exercise: p = 0.5 and 0.9", (0.5, 0.9)),
        _probs_case("reference numbers", (0.7, 0.95, 0.05, 0.99, 0.001)),
    ]
    knobs = [_knob_case(row["logits"], row["target"]) for row in rows[::3]]
    return {"rows": rows, "batches": batches, "sentences": sentences, "formats": format_vectors(), "knobs": knobs}


KNOB_VALUES = {"label_smoothing": (0.0, 0.1, 0.5), "focal_gamma": (0.5, 2.0), "temperature": (0.5, 2.0)}


def _knob_case(logits: list[float], target: int) -> dict:
    """One row through tokenloss with each knob of part 6: label smoothing (and its floor, the
    smoothed target's entropy), focal loss, and temperature (loss and entropy of softmax(z / T))."""
    row = torch.tensor([logits])
    t = torch.tensor([target])
    vocab = len(logits)
    case: dict = {"logits": logits, "target": target, "smoothing": [], "focal": [], "temperature": []}
    for eps in KNOB_VALUES["label_smoothing"]:
        q = torch.full((vocab,), eps / vocab, dtype=torch.float64)
        q[target] += 1 - eps
        floor = float(-(q * q.log()).sum()) if eps > 0 else 0.0
        loss = float(tokenloss.cross_entropy(row, t, label_smoothing=eps))
        case["smoothing"].append({"eps": eps, "loss": loss, "floor": floor})
    for gamma in KNOB_VALUES["focal_gamma"]:
        case["focal"].append({"gamma": gamma, "loss": float(tokenloss.cross_entropy(row, t, focal_gamma=gamma))})
    for temperature in KNOB_VALUES["temperature"]:
        logp, entropy = tokenloss.token_logprobs(row, t, temperature=temperature)
        case["temperature"].append({"t": temperature, "loss": -float(logp), "entropy": float(entropy)})
    return case


def main() -> None:
    """Print the vectors as JSON on standard output."""
    json.dump(generate_vectors(), sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
