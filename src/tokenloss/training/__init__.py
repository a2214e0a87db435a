"""Training a small model and reading its curves.

- :mod:`~tokenloss.training.loop`: the byte-level GPT training loop behind ``tokenloss train``.
- :mod:`~tokenloss.training.corpus`: the default corpus, the docstrings of Python's standard library.
- :mod:`~tokenloss.training.curves`: reading training logs, their verdicts and plots (``tokenloss curve``).

This package depends on the loss, :mod:`tokenloss.models` and :mod:`tokenloss.evaluation`; the loss
never imports it.
"""
