"""Calibration profiles: versioned JSON files keyed by a model fingerprint (generic machinery).

A profile is one JSON object naming its ``format`` and ``version``, written for one model
(identified by :func:`tokensparse.model_fingerprint` and its number of decoder layers). What a
profile holds is up to the method that needs it (Token Sparse Attention's drift profile lives in
:mod:`tokensparse.methods.drift_profile`); the engine only finds, reads, writes and checks the files.

Lookup order for a model without an explicit profile path: the profiles shipped with the package
(``tokensparse/profiles/<fingerprint>.json``), then the user cache
(``<cache>/profiles/<fingerprint>.json``), where ``tokensparse calibrate`` writes by default.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..models import cache_dir, model_fingerprint


class StaleProfileError(ValueError):
    """A calibration profile does not match the model (or this version of tokensparse), or is not a
    readable profile at all."""


def user_profile_path(fingerprint: str) -> Path:
    """Where a profile for the model with ``fingerprint`` goes in the user cache (and is looked up)."""
    return cache_dir() / "profiles" / f"{fingerprint}.json"


def find_profile(model) -> Path | None:
    """The profile file for ``model``: shipped with the package, else in the user cache, else None."""
    fp = model_fingerprint(model)
    shipped = resources.files("tokensparse") / "profiles" / f"{fp}.json"
    if shipped.is_file():
        return Path(str(shipped))
    user = user_profile_path(fp)
    return user if user.is_file() else None


def read_profile(path: str | Path, fmt: str, version: int, what: str = "profile") -> dict:
    """The JSON object in ``path`` after checking that it is a ``fmt`` profile of ``version``.

    Raises :class:`StaleProfileError` naming the path when the file is not JSON (e.g. truncated by
    an interrupted write), not a JSON object, of another format, or of another format version, so
    that a broken file is reported as such instead of as a raw ``JSONDecodeError``.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StaleProfileError(
            f"{path} is not a valid tokensparse {what} (invalid JSON: {e}); delete it and re-run `tokensparse calibrate`"
        ) from None
    if not isinstance(data, dict):
        raise StaleProfileError(f"{path} is not a tokensparse {what} (expected a JSON object, got {type(data).__name__})")
    if data.get("format") != fmt:
        raise StaleProfileError(f"{path} is not a tokensparse {what} (format={data.get('format')!r}, expected {fmt!r})")
    if data.get("version") != version:
        raise StaleProfileError(
            f"{path} has profile version {data.get('version')!r}, this tokensparse reads version {version}; "
            "re-run `tokensparse calibrate`"
        )
    return data


def write_profile(path: str | Path, data: dict) -> Path:
    """Write ``data`` as indented JSON at ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def check_profile_model(fingerprint: str, num_layers: int, model, what: str = "profile") -> None:
    """Raise :class:`StaleProfileError` unless a profile made for the model ``fingerprint`` with
    ``num_layers`` decoder layers was made for ``model``."""
    fp = model_fingerprint(model)
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    if fingerprint != fp or num_layers != n:
        raise StaleProfileError(
            f"{what} is for model {fingerprint} ({num_layers} layers) but this model is "
            f"{fp} ({n} layers); run `tokensparse calibrate` for this model or pass the matching profile"
        )
