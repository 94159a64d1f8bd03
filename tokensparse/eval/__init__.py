"""Evaluation harness: task generators (``tasks``: the v2 standard suite's natural-text RULER-style
tasks and the older synthetic ones), the shipped public-domain corpora (``corpus``), metrics, the
decode-path answer scorer (``scoring``), the grid runner (``grid`` config → ``runner`` JSONL rows),
paired statistics against dense (``stats``), the Markdown/PNG ``report``, and ``diagnose`` (why a
method loses: per-step selections and per-layer retention). ``commands`` adds the ``tokensparse
eval`` and ``tokensparse report`` subcommands."""
