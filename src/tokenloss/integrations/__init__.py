"""Integrations of tokenloss with other libraries; each submodule imports its library lazily.

- :mod:`tokenloss.integrations.transformers`: ``patch(model)`` makes a Hugging Face causal LM
  compute its training loss with :func:`tokenloss.linear_cross_entropy`, never building the logits
  (``pip install 'tokenloss[hf]'``).
"""
