"""Natural text shipped with tokensparse, for perplexity and natural-text haystacks.

Two public-domain corpora, both pure ASCII without digits (so numeric needles never collide with
the text), stored gzipped in ``tokensparse/data/``; ``tokensparse/data/README.md`` gives their
sources, licences and the commands that produced them:

* ``"kjv"``: the King James Bible, one verse per line in book order, chapters separated by a blank line;
* ``"devil"``: Ambrose Bierce's *The Devil's Dictionary* (1911), one sentence per line, entries
  separated by a blank line (satirical prose definitions and verse: another register than the KJV).
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

#: corpus name -> file inside the ``tokensparse/data`` folder
CORPORA = {"kjv": "kjv.txt.gz", "devil": "devil.txt.gz"}


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
    """The non-empty lines of a corpus (``"kjv"``: its 31,102 verses; ``"devil"``: its 4,010
    sentences and headwords), in order, cached."""
    return tuple(line for line in load_corpus(name).splitlines() if line.strip())
