"""Calibration profiles: versioned JSON files keyed by a model fingerprint (generic machinery).

A :class:`Profile` is one JSON object (``format = "tokensparse.profile"``, envelope version
:data:`PROFILE_VERSION`) holding a ``kind`` (what was measured, e.g. ``"drift"``), the kind's own
payload version (``kind_version``), the model it was measured on (:func:`tokensparse.model_fingerprint`,
model type, number of decoder layers), where the calibration text came from, and the ``payload``
(a JSON object only the method that needs it interprets). A method that needs one declares
``profile_kind`` / ``profile_version`` and a ``calibrate(model, input_ids) -> payload`` classmethod;
``tokensparse calibrate --method NAME`` runs it and writes the profile; the method finds it with
:func:`find_kind_profile` and loads it with :meth:`Profile.load` (which refuses another kind,
version or model with :class:`StaleProfileError`, naming the file and the fix).

Lookup order for a model without an explicit profile path: the profiles shipped with the package
(``tokensparse/profiles/<kind>/<fingerprint>.json``), then the user cache
(``<cache>/profiles/<kind>/<fingerprint>.json``), where ``tokensparse calibrate`` writes by default.
The drift profiles written before the generic format (``profiles/<fingerprint>.json``, format
``tokensparse.drift-profile``) are still found and read (:mod:`tokensparse.methods.drift_profile`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
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


# ---- the generic profile ----------------------------------------------------------------------------

PROFILE_FORMAT = "tokensparse.profile"
PROFILE_VERSION = 1


def kind_profile_path(fingerprint: str, kind: str) -> Path:
    """Where a ``kind`` profile for the model ``fingerprint`` goes in the user cache (and is looked up)."""
    return cache_dir() / "profiles" / kind / f"{fingerprint}.json"


def find_kind_profile(model, kind: str) -> Path | None:
    """The ``kind`` profile for ``model``: shipped with the package, else in the user cache, else None."""
    fp = model_fingerprint(model)
    shipped = resources.files("tokensparse") / "profiles" / kind / f"{fp}.json"
    if shipped.is_file():
        return Path(str(shipped))
    user = kind_profile_path(fp, kind)
    return user if user.is_file() else None


@dataclass
class Profile:
    """A calibration profile (see the module doc). ``payload`` is the method's JSON object."""

    kind: str
    kind_version: int
    model_fingerprint: str
    model_type: str
    num_layers: int
    source: str
    payload: dict
    format: str = PROFILE_FORMAT
    version: int = PROFILE_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @classmethod
    def for_model(cls, model, kind: str, kind_version: int, source: str, payload: dict) -> "Profile":
        cfg = model.config.get_text_config(decoder=True)
        return cls(kind=kind, kind_version=int(kind_version), model_fingerprint=model_fingerprint(model),
                   model_type=cfg.model_type, num_layers=cfg.num_hidden_layers, source=source, payload=payload)

    def save(self, path: str | Path) -> Path:
        return write_profile(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path, kind: str | None = None, kind_version: int | None = None) -> "Profile":
        """Read ``path``; with ``kind`` / ``kind_version``, refuse a profile of another kind or version."""
        data = read_profile(path, PROFILE_FORMAT, PROFILE_VERSION, what="calibration profile")
        names = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name != "created")
        unknown = sorted(set(data) - names)
        if missing or unknown or not isinstance(data.get("payload"), dict):
            raise StaleProfileError(
                f"{path} is not a valid tokensparse calibration profile (missing fields {missing}, unknown fields "
                f"{unknown}, or a payload that is not a JSON object); delete it and re-run `tokensparse calibrate`"
            )
        prof = cls(**data)
        if kind is not None and prof.kind != kind:
            raise StaleProfileError(f"{path} is a {prof.kind!r} profile, expected {kind!r}")
        if kind_version is not None and prof.kind_version != kind_version:
            raise StaleProfileError(
                f"{path} holds a {prof.kind!r} payload of version {prof.kind_version}, this tokensparse reads version "
                f"{kind_version}; re-run `tokensparse calibrate`"
            )
        return prof

    def check(self, model) -> None:
        """Raise :class:`StaleProfileError` unless the profile was made for this model."""
        check_profile_model(self.model_fingerprint, self.num_layers, model, what=f"{self.kind} profile")


def calibrate(model, method, input_ids, source: str) -> Profile:
    """Run the offline calibration of ``method`` (a config class or instance with ``profile_kind``)
    on ``input_ids (1, L)`` and return the :class:`Profile` (not yet written)."""
    cls = method if isinstance(method, type) else type(method)
    kind = getattr(cls, "profile_kind", "")
    if not kind:
        raise ValueError(f"method {getattr(cls, 'name', cls.__name__)!r} needs no calibration (no profile_kind)")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("calibration takes one prompt: input_ids of shape (1, L)")
    payload = cls.calibrate(model, input_ids)
    if not isinstance(payload, dict):
        raise TypeError(f"{cls.__name__}.calibrate must return a dict (the profile payload), got {type(payload).__name__}")
    json.dumps(payload)  # JSON-serialisable, or a TypeError naming the value now rather than a broken file later
    return Profile.for_model(model, kind, cls.profile_version, source, payload)
