"""Fixtures of the explain tests: a tiny byte-level model with varied predictions, and a running page server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from tokenloss.explain.server import ExplainServer
from tokenloss.models import ByteLM
from tokenloss.models.bytegpt import ByteGPT, GPTConfig


def make_tiny_model() -> ByteLM:
    """A 1-layer byte GPT with random weights; lm_head drawn N(0, 0.3) so predictions are far from uniform."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    module = ByteGPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    torch.nn.init.normal_(module.lm_head.weight, std=0.3)
    torch.random.set_rng_state(generator_state)
    return ByteLM(module, name="tiny random byte GPT")


@pytest.fixture(scope="session")
def tiny_model() -> ByteLM:
    return make_tiny_model()


@pytest.fixture(scope="session")
def serve():
    """``serve(**kwargs)``: a context manager running an :class:`ExplainServer` (see :func:`running_server`)."""
    return running_server


@contextmanager
def running_server(**kwargs) -> Iterator[ExplainServer]:
    """An :class:`ExplainServer` on a free port of 127.0.0.1, serving from a thread until the block ends."""
    server = ExplainServer(port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
