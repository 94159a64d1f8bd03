"""Calibration profiles: versioned JSON files keyed by a model fingerprint.

The first profile kind is Token Sparse Attention's *Representation Drift*: for each decoder layer,
``drift = mean_t ||h_out - h_in|| / (||h_in|| + 1e-8)`` of the residual stream across the whole
block, measured on one long natural-text prompt and normalised over layers to sum to 1. Layers
whose drift is at most the ``quantile`` of all drifts are the ones made sparse.

Lookup order for a model without an explicit profile path: the profiles shipped with the package
(``tokensparse/profiles/<fingerprint>.json``), then the user cache
(``<cache>/profiles/<fingerprint>.json``), where ``tokensparse calibrate`` writes by default.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..models import cache_dir, model_fingerprint

PROFILE_FORMAT = "tokensparse.drift-profile"
PROFILE_VERSION = 1


class StaleProfileError(ValueError):
    """A calibration profile does not match the model (or this version of tokensparse)."""


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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DriftProfile":
        data = json.loads(Path(path).read_text())
        if data.get("format") != PROFILE_FORMAT:
            raise StaleProfileError(f"{path} is not a tokensparse drift profile (format={data.get('format')!r})")
        if data.get("version") != PROFILE_VERSION:
            raise StaleProfileError(
                f"{path} has profile version {data.get('version')}, this tokensparse reads version {PROFILE_VERSION}; "
                "re-run `tokensparse calibrate`"
            )
        return cls(**data)

    def check(self, model) -> None:
        """Raise :class:`StaleProfileError` unless the profile was made for this model."""
        fp = model_fingerprint(model)
        n = model.config.get_text_config(decoder=True).num_hidden_layers
        if self.model_fingerprint != fp or self.num_layers != n:
            raise StaleProfileError(
                f"drift profile is for model {self.model_fingerprint} ({self.num_layers} layers) but this model is "
                f"{fp} ({n} layers); run `tokensparse calibrate` for this model or pass the matching profile"
            )


def user_profile_path(fingerprint: str) -> Path:
    return cache_dir() / "profiles" / f"{fingerprint}.json"


def find_profile(model) -> Path | None:
    """The drift profile for ``model``: shipped with the package, else in the user cache, else None."""
    fp = model_fingerprint(model)
    shipped = resources.files("tokensparse") / "profiles" / f"{fp}.json"
    if shipped.is_file():
        return Path(str(shipped))
    user = user_profile_path(fp)
    return user if user.is_file() else None


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
