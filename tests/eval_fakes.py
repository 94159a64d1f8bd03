"""Fake tokenizers for the eval tests: deterministic, exact to decode, no files, no network.

They implement exactly what ``tokensparse.eval`` uses of a Hugging Face tokenizer:
``tok(text, add_special_tokens=..., return_offsets_mapping=...)`` returning an object with
``.input_ids`` (and ``["offset_mapping"]``), and ``tok.decode(ids, skip_special_tokens=...)``.

``WordTokenizer`` cuts text like a byte-level BPE pre-tokenizer (a word with its leading space,
single digits as SmolLM2 does, punctuation runs, whitespace) and gives each new piece the next
free id, so ``decode(encode(text)) == text``. ``CharTokenizer`` is one token per character
(``id = ord(c)``). Ids 0, 1, 2 are pad, BOS and EOS; neither tokenizer adds BOS unless
``add_bos=True``.
"""

from __future__ import annotations

import re

import pytest

PAD, BOS, EOS = 0, 1, 2


class Encoding(dict):
    """A dict that also exposes its keys as attributes (like ``BatchEncoding``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Base:
    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def __init__(self, add_bos: bool = False):
        self.add_bos = add_bos

    def _pieces(self, text: str) -> list[tuple[str, int, int]]:
        raise NotImplementedError

    def _id(self, piece: str) -> int:
        raise NotImplementedError

    def _piece(self, i: int) -> str | None:
        raise NotImplementedError

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False, **_):
        pieces = self._pieces(text)
        ids = [self._id(p) for p, _, _ in pieces]
        offsets = [(s, e) for _, s, e in pieces]
        if add_special_tokens and self.add_bos:
            ids, offsets = [BOS] + ids, [(0, 0)] + offsets
        enc = Encoding(input_ids=ids)
        if return_offsets_mapping:
            enc["offset_mapping"] = offsets
        return enc

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if i in (PAD, BOS, EOS):
                if not skip_special_tokens:
                    out.append(("<pad>", "<s>", "</s>")[i])
                continue
            piece = self._piece(i)
            out.append(piece if piece is not None else f"<unk{i}>")
        return "".join(out)


class WordTokenizer(_Base):
    """Word-level pieces with a vocabulary that grows as text is seen (capped by ``max_vocab``)."""

    PATTERN = re.compile(r"\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+")

    def __init__(self, add_bos: bool = False, max_vocab: int | None = None):
        super().__init__(add_bos)
        self.max_vocab = max_vocab
        self.vocab: dict[str, int] = {}
        self.inverse: dict[int, str] = {}

    def _pieces(self, text):
        return [(m.group(), m.start(), m.end()) for m in self.PATTERN.finditer(text)]

    def _id(self, piece):
        i = self.vocab.get(piece)
        if i is None:
            i = len(self.vocab) + 3
            if self.max_vocab is not None and i >= self.max_vocab:
                raise ValueError(f"WordTokenizer: more than {self.max_vocab} distinct pieces")
            self.vocab[piece] = i
            self.inverse[i] = piece
        return i

    def _piece(self, i):
        return self.inverse.get(i)


class CharTokenizer(_Base):
    """One token per character, ``id = ord(c)`` (ASCII text gives ids below 128)."""

    def _pieces(self, text):
        return [(c, i, i + 1) for i, c in enumerate(text)]

    def _id(self, piece):
        return ord(piece)

    def _piece(self, i):
        return chr(i) if i > 2 else None


# ---- fixtures shared by the runner and peer tests (import them by name into the test module) ----


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama whose vocabulary covers the fake tokenizers' ids."""
    from tokensparse.testing import tiny_model

    return tiny_model("llama", vocab_size=256)


@pytest.fixture
def tok():
    return WordTokenizer(max_vocab=256)
