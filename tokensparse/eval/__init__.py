"""Evaluation harness: task generators, the shipped natural-text corpus, metrics, the grid runner
(``grid`` config → ``runner`` JSONL rows) and the Markdown/PNG ``report``; ``commands`` adds the
``tokensparse eval`` and ``tokensparse report`` subcommands."""
