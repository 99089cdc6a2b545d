"""Strict parsing of environment variables: a bad value stops start-up with a message naming it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class ConfigError(RuntimeError):
    pass


def env_str(name: str, default: str | None = None) -> str:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigError(f"environment variable {name} is required but not set")
        return default
    return value


def _env_number(name: str, default: Any, parse: Callable[[str], Any], kind: str) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be {kind}, got {raw!r}") from None


def env_int(name: str, default: int) -> int:
    return int(_env_number(name, default, int, "an integer"))


def env_float(name: str, default: float) -> float:
    return float(_env_number(name, default, float, "a number"))


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"environment variable {name} must be a boolean (true/false), got {raw!r}")


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def state_dir() -> Path:
    """Where embedded servers and local artifacts live (git-ignored)."""
    base = Path(__file__).resolve().parent.parent
    return Path(env_str("PLATFORM_STATE_DIR", str(base / ".state"))).resolve()
