"""Token Sparse Attention's *Representation Drift* profile (what ``tokensparse calibrate`` writes).

For each decoder layer, ``drift = mean_t ||h_out - h_in|| / (||h_in|| + 1e-8)`` of the residual
stream across the whole block, measured on one long natural-text prompt and normalised over layers
to sum to 1. Layers whose drift is at most the ``quantile`` of all drifts are the ones made sparse.

This module is not a registered method (the registry imports only ``_MODULES``); the file lookup,
format/version checks and staleness errors are the engine's generic profile machinery
(:mod:`tokensparse.engine.calibration`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..engine.calibration import (
    StaleProfileError,
    check_profile_model,
    find_profile,
    read_profile,
    user_profile_path,
    write_profile,
)
from ..models import model_fingerprint

PROFILE_FORMAT = "tokensparse.drift-profile"
PROFILE_VERSION = 1

__all__ = ["DriftProfile", "PROFILE_FORMAT", "PROFILE_VERSION", "StaleProfileError", "calibrate_drift",
           "find_profile", "measure_drift", "user_profile_path"]


@dataclass
class DriftProfile:
    model_fingerprint: str
    model_type: str
    num_layers: int
    tokens: int
    source: str
    drift: list[float]
    format: str = PROFILE_FORMAT
    version: int = PROFILE_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def sparse_layers(self, quantile: float = 0.5) -> list[int]:
        """Layers whose drift is ``<=`` the given quantile of all layers' drift (low drift = sparse)."""
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"drift quantile must lie in [0, 1], got {quantile}")
        d = torch.tensor(self.drift, dtype=torch.float64)
        thr = torch.quantile(d, quantile).item()
        return [i for i, x in enumerate(self.drift) if x <= thr]

    def save(self, path: str | Path) -> Path:
        return write_profile(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "DriftProfile":
        data = read_profile(path, PROFILE_FORMAT, PROFILE_VERSION, what="drift profile")
        names = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name != "created")
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise StaleProfileError(
                f"{path} is not a valid tokensparse drift profile (missing fields {missing}, unknown fields "
                f"{unknown}); delete it and re-run `tokensparse calibrate`"
            )
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
