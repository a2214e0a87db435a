"""The interactive page of ``tokenloss explain``: a local server and the packaged page that teaches the loss.

:class:`~tokenloss.explain.server.ExplainServer` serves ``static/`` (HTML, CSS, JavaScript; nothing
from the network) and scores sentences with a local model; :mod:`tokenloss.explain.vectors` makes
the test vectors that check the page's JavaScript math against :func:`tokenloss.cross_entropy`.
"""

from tokenloss.explain.server import DEFAULT_HOST, ExplainServer

__all__ = ["DEFAULT_HOST", "ExplainServer"]
