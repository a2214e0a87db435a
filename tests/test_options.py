"""tokenloss.options: the options listed once, and every entry point taking exactly them."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
import torch
from torch.testing import assert_close

import tokenloss as tl
from tokenloss.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from tokenloss.options import OPTION_NAMES, LossOptions, takes_loss_options
from tokenloss.reference import reference_cross_entropy

# Each option away from its default (a value that changes the loss where it can).
NON_DEFAULT = {
    "ignore_index": 3,
    "shift": True,
    "reduction": "sum",
    "label_smoothing": 0.1,
    "z_loss": 0.01,
    "softcap": 2.0,
    "focal_gamma": 2.0,
    "check_inputs": False,
    "chunk_size": 2,
}

ENTRY_POINTS = [
    tl.cross_entropy,
    tl.linear_cross_entropy,
    tl.CrossEntropyLoss,
    tl.LinearCrossEntropyLoss,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    reference_cross_entropy,
]


def test_non_default_values_cover_every_option():
    """This file tests every option: a new LossOptions field fails here until it has a value below."""
    assert set(NON_DEFAULT) == set(OPTION_NAMES)


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__qualname__)
def test_every_entry_point_takes_every_option(entry):
    """Each entry point's signature lists each option as a keyword-only argument with the LossOptions default."""
    parameters = inspect.signature(entry).parameters
    for option in fields(LossOptions):
        assert option.name in parameters, f"{entry.__qualname__} lacks {option.name}"
        assert parameters[option.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[option.name].default == option.default
    assert "options" not in parameters or parameters["options"].kind is inspect.Parameter.KEYWORD_ONLY


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5), generator=gen)
    targets[0, 2] = 3  # the custom ignore_index appears
    return hidden, weight, targets


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_modules_and_functions_agree_with_the_reference_on_each_option(name):
    """With one option set, function, Module and the float64 reference give the same number: no entry
    point forgets to pass an option on."""
    hidden, weight, targets = _inputs()
    logits = hidden @ weight.T
    option = {name: NON_DEFAULT[name]}
    want = reference_cross_entropy(logits, targets, **option)
    results = {
        "cross_entropy": tl.cross_entropy(logits, targets, **option),
        "CrossEntropyLoss": tl.CrossEntropyLoss(**option)(logits, targets),
        "linear_cross_entropy": tl.linear_cross_entropy(hidden, weight, targets, **option),
        "LinearCrossEntropyLoss": tl.LinearCrossEntropyLoss(**option)(hidden, weight, targets),
        "options=": tl.cross_entropy(logits, targets, options=LossOptions(**option)),
    }
    for label, got in results.items():
        assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{label} with {option}")
    if name not in ("check_inputs", "chunk_size"):  # these two change how, not what
        assert not torch.allclose(want, reference_cross_entropy(logits, targets)), f"{name} changes nothing"


def test_options_object_and_keywords_are_exclusive():
    """A caller passes either options= or the separate keywords; a wrong options object is named."""
    logits, targets = torch.zeros(2, 5), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="either options= or the separate options"):
        tl.cross_entropy(logits, targets, options=LossOptions(), shift=True)
    with pytest.raises(TypeError, match="options must be a tokenloss.options.LossOptions"):
        tl.cross_entropy(logits, targets, options={"shift": True})
    with pytest.raises(TypeError, match="unexpected keyword argument 'label_smoothin'"):
        tl.cross_entropy(logits, targets, label_smoothin=0.1)


def test_modules_check_options_when_built():
    """A Module checks its options in its constructor, not at the first batch."""
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        tl.CrossEntropyLoss(label_smoothing=2.0)
    assert "label_smoothing=0.1" in repr(tl.LinearCrossEntropyLoss(label_smoothing=0.1))


def test_decorator_needs_an_options_parameter():
    with pytest.raises(TypeError, match="keyword-only 'options' parameter"):

        @takes_loss_options
        def no_options(x):
            return x


def test_help_lists_every_option():
    """help(tl.cross_entropy) shows each option with its default and meaning."""
    for name in OPTION_NAMES:
        assert f"    {name} (default " in tl.cross_entropy.__doc__
