"""Peer libraries run on tokensparse's tasks with identical token ids, for side-by-side comparison."""
