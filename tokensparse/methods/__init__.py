"""Method registry: ``names()``, ``get(name)`` and the table behind ``tokensparse methods``.

Each method is one file holding a ``@dataclass`` config (a :class:`tokensparse.engine.Method`).
Adding a method = one file + one line in ``_MODULES`` + one entry in the test matrix (which
iterates ``names()``, so it picks the method up automatically).
"""

from __future__ import annotations

import importlib

from ..engine.session import Method

_MODULES = ("token_sparse", "token_select", "snapkv", "streaming_llm")
_REGISTRY: dict[str, type[Method]] = {}


class UnknownMethodError(KeyError):
    def __str__(self):
        return str(self.args[0])


def _load() -> None:
    if _REGISTRY:
        return
    for mod in _MODULES:
        module = importlib.import_module(f"{__name__}.{mod}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Method) and obj is not Method and obj.name:
                if obj.name in _REGISTRY and _REGISTRY[obj.name] is not obj:
                    raise RuntimeError(f"two methods are named {obj.name!r}")
                _REGISTRY[obj.name] = obj


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
    """One row per method: name, phase, effect on KV memory, calibration, paper."""
    _load()
    rows = []
    for name in names():
        cls = _REGISTRY[name]
        rows.append(
            {
                "name": name,
                "phase": cls.phase,
                "kv_memory": cls.kv_memory,
                "calibration": cls.calibration,
                "paper": cls.paper,
            }
        )
    return rows


def markdown_table() -> str:
    rows = table()
    head = "| method | phase | effect on KV memory | calibration | paper |\n|---|---|---|---|---|\n"
    return head + "".join(
        f"| `{r['name']}` | {r['phase']} | {r['kv_memory']} | {r['calibration']} | {r['paper']} |\n" for r in rows
    )
