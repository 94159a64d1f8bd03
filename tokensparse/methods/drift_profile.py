"""Token Sparse Attention's *Representation Drift* profile (what ``tokensparse calibrate`` writes).

For each decoder layer, ``drift = mean_t ||h_out - h_in|| / (||h_in|| + 1e-8)`` of the residual
stream across the whole block, measured on one long natural-text prompt and normalised over layers
to sum to 1. Layers whose drift is at most the ``quantile`` of all drifts are the ones made sparse.

This module is not a registered method (the registry imports only ``_MODULES``). The profile is a
generic :class:`~tokensparse.engine.calibration.Profile` of kind ``drift`` (payload: ``tokens`` and
one ``drift`` value per layer), written by ``tokensparse calibrate --method token_sparse``; the file
lookup, format/version checks and staleness errors are the engine's generic profile machinery.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.calibration import (
    Profile,
    StaleProfileError,
    check_profile_model,
    find_kind_profile,
    find_profile,
    read_profile,
    user_profile_path,
)
from ..models import model_fingerprint

#: the generic profile kind and payload version (:class:`~tokensparse.engine.calibration.Profile`)
KIND = "drift"
KIND_VERSION = 1
#: the format drift profiles had before the generic one (still read: shipped or user files)
LEGACY_FORMAT = "tokensparse.drift-profile"
LEGACY_VERSION = 1

__all__ = ["DriftProfile", "KIND", "KIND_VERSION", "LEGACY_FORMAT", "StaleProfileError", "calibrate_drift",
           "find_drift_profile", "measure_drift", "user_profile_path"]


def find_drift_profile(model) -> Path | None:
    """The drift profile for ``model``: the generic ``drift`` profile (shipped, then the user cache),
    else a file of the earlier format (``profiles/<fingerprint>.json``), else ``None``."""
    return find_kind_profile(model, KIND) or find_profile(model)


@dataclass
class DriftProfile:
    model_fingerprint: str
    model_type: str
    num_layers: int
    tokens: int
    source: str
    drift: list[float]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def sparse_layers(self, quantile: float = 0.5) -> list[int]:
        """Layers whose drift is ``<=`` the given quantile of all layers' drift (low drift = sparse)."""
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"drift quantile must lie in [0, 1], got {quantile}")
        d = torch.tensor(self.drift, dtype=torch.float64)
        thr = torch.quantile(d, quantile).item()
        return [i for i, x in enumerate(self.drift) if x <= thr]

    def to_profile(self) -> Profile:
        return Profile(kind=KIND, kind_version=KIND_VERSION, model_fingerprint=self.model_fingerprint,
                       model_type=self.model_type, num_layers=self.num_layers, source=self.source,
                       payload={"tokens": self.tokens, "drift": list(self.drift)}, created=self.created)

    @classmethod
    def from_profile(cls, prof: Profile, path="profile") -> "DriftProfile":
        drift = prof.payload.get("drift")
        if not isinstance(drift, list) or len(drift) != prof.num_layers or not isinstance(prof.payload.get("tokens"), int):
            raise StaleProfileError(f"{path}: a drift payload needs 'tokens' and one 'drift' value per layer; "
                                    "delete it and re-run `tokensparse calibrate`")
        return cls(model_fingerprint=prof.model_fingerprint, model_type=prof.model_type, num_layers=prof.num_layers,
                   tokens=prof.payload["tokens"], source=prof.source, drift=[float(x) for x in drift],
                   created=prof.created)

    def save(self, path: str | Path) -> Path:
        """Written as a generic profile of kind ``drift``."""
        return self.to_profile().save(path)

    @classmethod
    def load(cls, path: str | Path) -> "DriftProfile":
        """A generic ``drift`` profile, or a file of the earlier drift-profile format."""
        try:
            fmt = json.loads(Path(path).read_text()).get("format")
        except (ValueError, UnicodeDecodeError, AttributeError):
            fmt = None  # not JSON / not an object: Profile.load names the problem
        if fmt != LEGACY_FORMAT:
            return cls.from_profile(Profile.load(path, KIND, KIND_VERSION), path)
        data = read_profile(path, LEGACY_FORMAT, LEGACY_VERSION, what="drift profile")
        names = {"model_fingerprint", "model_type", "num_layers", "tokens", "source", "drift", "created",
                 "format", "version"}
        missing = sorted(n for n in names - {"created"} if n not in data)
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise StaleProfileError(
                f"{path} is not a valid tokensparse drift profile (missing fields {missing}, unknown fields "
                f"{unknown}); delete it and re-run `tokensparse calibrate`"
            )
        data.pop("format"), data.pop("version")
        return cls(**data)

    def check(self, model) -> None:
        """Raise :class:`StaleProfileError` unless the profile was made for this model."""
        check_profile_model(self.model_fingerprint, self.num_layers, model, what="drift profile")


def _decoder_layers(model):
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError("could not find the decoder layers (expected model.model.layers)")
    return layers


@torch.no_grad()
def measure_drift(model, input_ids: torch.Tensor) -> list[float]:
    """Per-layer representation drift on one prompt (normalised to sum to 1), dense attention."""
    raw: list[float] = []
    hooks = []

    def hook(module, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = output[0] if isinstance(output, tuple) else output
        rel = (h_out.float() - h_in.float()).norm(dim=-1) / (h_in.float().norm(dim=-1) + 1e-8)
        raw.append(rel.mean().item())

    for layer in _decoder_layers(model):
        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    total = sum(raw)
    return [x / total for x in raw]


def calibrate_drift(model, input_ids: torch.Tensor, source: str) -> DriftProfile:
    """Measure drift on ``input_ids`` (1, L) and return a profile for ``model``."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("calibration takes one prompt: input_ids of shape (1, L)")
    drift = measure_drift(model, input_ids)
    cfg = model.config.get_text_config(decoder=True)
    return DriftProfile(
        model_fingerprint=model_fingerprint(model),
        model_type=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        tokens=int(input_ids.shape[1]),
        source=source,
        drift=drift,
    )
