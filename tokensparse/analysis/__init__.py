"""Analysis observers: read attention without changing it (``ts.observe(model, ...)``).

* :class:`~tokensparse.analysis.sinks.SinkDetector`: first-token and secondary attention sinks
  per layer and head (Gu et al.'s sink score).
"""

from .sinks import SinkDetector, sink_scores

__all__ = ["SinkDetector", "sink_scores"]
