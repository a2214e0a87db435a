"""tl.CrossEntropyLoss: the Module takes the function's options in the function's order and passes every one on."""

from __future__ import annotations

import inspect

import pytest
import torch

import tokenloss as tl

PER_BATCH = ("mask", "token_weights", "num_items")  # forward() arguments; the rest are constructor options


def test_signature_matches_the_function():
    """Every option of tl.cross_entropy is a constructor or forward argument, in the same order, same default."""
    function = inspect.signature(tl.cross_entropy).parameters
    constructor = inspect.signature(tl.CrossEntropyLoss.__init__).parameters
    forward = inspect.signature(tl.CrossEntropyLoss.forward).parameters
    options = [name for name in function if name not in ("logits", "targets") + PER_BATCH]
    assert [name for name in constructor if name != "self"] == options
    assert [name for name in forward if name != "self"] == ["logits", "targets", *PER_BATCH]
    for name in options:
        assert constructor[name].default == function[name].default, name


CASES = [
    {},
    {"reduction": "sum", "label_smoothing": 0.1},
    {"reduction": "none", "softcap": 3.0, "z_loss": 1e-3},
    {"shift": True, "focal_gamma": 2.0, "ignore_index": 2, "chunk_size": 3},
    {"inplace_backward": True, "check_inputs": False},
]


@pytest.mark.parametrize("options", CASES, ids=str)
def test_module_equals_function(options, make_logits, make_targets):
    """The Module's loss and gradient are bit-identical to the function's with the same options and tensors."""
    logits = make_logits(3, 7, 11)
    targets = make_targets((3, 7), 11, ignore_every=4, ignore_index=options.get("ignore_index", -100))
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(5)) > 0.2
    weights = torch.rand(3, 7, generator=torch.Generator().manual_seed(6))
    batch = {"mask": mask, "token_weights": weights, "num_items": 9}

    results = []
    for call in (
        lambda x: tl.cross_entropy(x, targets, **options, **batch),
        lambda x: tl.CrossEntropyLoss(**options)(x, targets, **batch),
    ):
        x = logits.clone().requires_grad_()
        loss = call(x * 1)  # a non-leaf, so that inplace_backward may overwrite it
        loss.sum().backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)


def test_extra_repr_shows_the_options():
    """print(module) shows the options it stores."""
    text = repr(tl.CrossEntropyLoss(label_smoothing=0.1, softcap=30.0))
    assert "label_smoothing=0.1" in text and "softcap=30.0" in text


def test_bad_option_is_reported_with_its_name():
    """A bad option raises the function's error, naming the argument."""
    with pytest.raises(ValueError, match="^reduction"):
        tl.CrossEntropyLoss(reduction="avg")(torch.zeros(2, 3), torch.tensor([0, 1]))
