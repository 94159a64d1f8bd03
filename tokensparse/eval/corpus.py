"""Natural text shipped with tokensparse, for perplexity and natural-text haystacks.

The only corpus is ``"kjv"``: the King James Bible (public domain), one verse per line in book order,
chapters separated by a blank line, pure ASCII. It is stored gzipped at ``tokensparse/data/kjv.txt.gz``;
``tokensparse/data/README.md`` gives its source, licence and the commands that produced it.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

#: corpus name -> file inside the ``tokensparse/data`` folder
CORPORA = {"kjv": "kjv.txt.gz"}


def _check(name: str) -> str:
    if name not in CORPORA:
        raise KeyError(f"unknown corpus {name!r}; available: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


@functools.lru_cache(maxsize=None)
def load_corpus(name: str = "kjv") -> str:
    """The whole text of a shipped corpus as one string (read once, then cached)."""
    filename = _check(name)
    data = resources.files("tokensparse").joinpath("data", filename).read_bytes()
    return gzip.decompress(data).decode("utf-8")


@functools.lru_cache(maxsize=None)
def load_lines(name: str = "kjv") -> tuple[str, ...]:
    """The non-empty lines of a corpus (for ``"kjv"``: the 31,102 verses, in order), cached."""
    return tuple(line for line in load_corpus(name).splitlines() if line.strip())
