"""Strategy plugins: classes registered under the `fedqf.strategies` entry-point group, looked up by name."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from fedqf.errors import ConfigError

GROUP = "fedqf.strategies"


def strategy_names() -> list[str]:
    """Names of the installed strategies, sorted."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_strategy_class(name: str) -> Any:
    """The strategy class registered as `name`; ConfigError naming the installed ones if there is none."""
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        installed = ", ".join(repr(n) for n in strategy_names()) or "none (is fedqf installed?)"
        raise ConfigError(f"key 'strategy.name': unknown strategy {name!r}; expected one of {installed}")
    try:
        return matches[0].load()
    except Exception as exc:
        raise ConfigError(f"key 'strategy.name': strategy {name!r} failed to load ({exc})") from exc
