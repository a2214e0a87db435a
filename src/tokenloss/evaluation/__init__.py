"""Reading the loss: metrics, the streaming meter, scoring texts with a model, reports.

- :mod:`~tokenloss.evaluation.metrics`: pure functions (perplexity, bits per byte, per-token
  statistics, calibration); a leaf that needs only torch and the loss.
- :mod:`~tokenloss.evaluation.meter`: :class:`~tokenloss.evaluation.meter.LossMeter`, sums over
  batches and ranks, divided once at the end.
- :mod:`~tokenloss.evaluation.scoring`: a text through a model in windows, every token scored once.
- :mod:`~tokenloss.evaluation.reports`: CSV, JSON Lines, the reliability diagram and the HTML report.
- :mod:`~tokenloss.evaluation.formatting`: one way to print a number, everywhere.

This package depends on the loss (:mod:`tokenloss.functional`) and on :mod:`tokenloss.models`; the
loss never imports it.
"""
