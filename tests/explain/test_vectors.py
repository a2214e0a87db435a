"""Tests of the explain page's test vectors: they hold tokenloss's answers, which match the float64 reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tokenloss.explain.vectors import WORKED_SENTENCE_PROBS, generate_vectors, main
from tokenloss.reference import reference_cross_entropy


@pytest.fixture(scope="module")
def vectors():
    return generate_vectors()


def float32_atol(logits) -> float:
    """tokenloss's float32 error: about one rounding of logsumexp at the scale of the largest logit."""
    return 1e-6 + 4 * 2.0**-23 * max(1.0, max(abs(z) for z in logits))


def test_rows_match_the_float64_reference(vectors):
    """Each row's loss, logsumexp, softmax and gradient agree with the plain float64 formulas."""
    for row in vectors["rows"]:
        logits = torch.tensor(row["logits"], dtype=torch.float64)
        target = torch.tensor([row["target"]])
        loss = reference_cross_entropy(logits[None], target, reduction="sum")
        atol = float32_atol(row["logits"])
        torch.testing.assert_close(row["loss"], float(loss), rtol=0, atol=atol, msg=row["name"])
        torch.testing.assert_close(row["logsumexp"], float(torch.logsumexp(logits, 0)), rtol=0, atol=atol)
        softmax = torch.softmax(logits, 0)
        torch.testing.assert_close(torch.tensor(row["softmax"], dtype=torch.float64), softmax)
        onehot = torch.nn.functional.one_hot(target[0], len(logits)).double()
        gradient = torch.tensor(row["gradient"], dtype=torch.float64)
        torch.testing.assert_close(gradient, softmax - onehot, rtol=0, atol=atol)
        assert all(float(torch.tensor(z, dtype=torch.float32)) == z for z in row["logits"])  # exact in float32


def test_cases_cover_the_extremes(vectors):
    names = {row["name"] for row in vectors["rows"]}
    assert {"logits of +-50", "logits of +-1000", "single word V=1", "uniform V=6"} <= names
    uniform = next(row for row in vectors["rows"] if row["name"] == "uniform V=6")
    assert uniform["loss"] == pytest.approx(math.log(6), abs=1e-6)
    big = [row["loss"] for row in vectors["rows"] if row["name"] == "logits of +-1000"]
    assert big[1] == pytest.approx(2000.3133, abs=1e-3)


@pytest.mark.parametrize("index", range(4))
def test_batches_match_the_reference(vectors, index):
    batch = vectors["batches"][index]
    rows = torch.tensor(batch["rows"], dtype=torch.float64)
    targets = torch.tensor(batch["targets"])
    ignore_index = batch["ignore_index"]
    counted = targets != ignore_index
    want = float(reference_cross_entropy(rows, targets, ignore_index=ignore_index)) if counted.any() else 0.0
    atol = float32_atol([z for row in batch["rows"] for z in row])
    torch.testing.assert_close(batch["mean_loss"], want, rtol=0, atol=atol)


def test_worked_sentence_numbers(vectors):
    """The Quick brown fox: 3.91, 1.90, 0.92, 0.51, average 1.81 (and -ln 0.5, -ln 0.9 for the exercise)."""
    fox, exercise, _ = vectors["sentences"]
    assert fox["probs"] == list(WORKED_SENTENCE_PROBS)
    assert [round(x, 2) for x in fox["losses"]] == [3.91, 1.90, 0.92, 0.51]
    assert round(fox["mean_loss"], 2) == 1.81
    assert [round(x, 3) for x in exercise["losses"]] == [0.693, 0.105]


def test_main_prints_the_vectors_as_json(capsys, vectors):
    main()
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(vectors))
