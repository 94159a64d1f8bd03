"""Method registry: ``names()``, ``get(name)`` and the table behind ``tokensparse methods``.

Each method is one file holding a ``@dataclass`` config (a :class:`tokensparse.engine.Method`).
Adding a method = one file + one line in ``_MODULES`` + one entry in the test matrix (which
iterates ``names()``, so it picks the method up automatically).
"""

from __future__ import annotations

import importlib

from ..engine.method import Method, Phase

_MODULES = ("token_sparse", "token_select", "tidal_decode", "recycled_attention", "landmark", "spatten", "fasa", "hip", "biformer", "xattention", "rectified", "dhsa", "sparsifiner", "superlinear", "minference", "cca", "hisa", "snapkv", "pyramid_kv", "ada_kv", "tca", "streaming_llm", "tova", "h2o", "quest", "zero_tuning", "frugal_prompt", "fast_v", "razor_attention")
_REGISTRY: dict[str, type[Method]] = {}

#: the values ``Method.phase`` may take (when it acts is the free-text ``Method.schedule``)
PHASES = tuple(p.value for p in Phase)


class UnknownMethodError(KeyError):
    def __str__(self):
        return str(self.args[0])


def _check(cls: type[Method]) -> None:
    """Refuse a method whose ``phase`` is not a :class:`~tokensparse.engine.Phase` (code compares it)."""
    if not isinstance(cls.phase, Phase):
        raise ValueError(
            f"method {cls.name!r} ({cls.__module__}.{cls.__qualname__}) has phase={cls.phase!r}; phase must be "
            f"a tokensparse.engine.Phase, one of {', '.join(p.name for p in Phase)} (describe when it acts in `schedule`)"
        )


def _load() -> None:
    if _REGISTRY:
        return
    found: dict[str, type[Method]] = {}  # published only when every method is valid
    for mod in _MODULES:
        module = importlib.import_module(f"{__name__}.{mod}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Method) and obj is not Method and obj.name:
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two methods are named {obj.name!r}")
                _check(obj)
                found[obj.name] = obj
    _REGISTRY.update(found)


def names() -> list[str]:
    """Registered method names, sorted."""
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    """The config class of a method (call it to build a config)."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; registered methods: {', '.join(names())}") from None


def table() -> list[dict[str, str]]:
    """One row per method: name, phase, schedule, effect on KV memory, calibration, paper."""
    _load()
    rows = []
    for name in names():
        cls = _REGISTRY[name]
        rows.append(
            {
                "name": name,
                "phase": cls.phase.value,
                "schedule": cls.schedule,
                "kv_memory": cls.kv_memory,
                "calibration": cls.calibration,
                "paper": cls.paper,
            }
        )
    return rows


def markdown_table() -> str:
    rows = table()
    head = "| method | phase | schedule | effect on KV memory | calibration | paper |\n|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| `{r['name']}` | {r['phase']} | {r['schedule']} | {r['kv_memory']} | {r['calibration']} | {r['paper']} |\n"
        for r in rows
    )
