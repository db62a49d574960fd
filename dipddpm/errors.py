"""Errors a user can act on: one line naming the key, the value and what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot be used; raised before any training starts."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")


class DivergedError(RuntimeError):
    """The loss became NaN or infinite; the run is recorded with status 'diverged'."""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(f"loss became {loss} at step {step}")


def is_number(value) -> bool:
    """A Python int or float that is not a bool (YAML's true would otherwise pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require(condition: bool, key: str, value: object, allowed: str) -> None:
    """Raise ConfigError(key, value, allowed) unless condition holds."""
    if not condition:
        raise ConfigError(key, value, allowed)


def require_choice(key: str, value: object, choices) -> None:
    """Raise ConfigError unless value is one of choices."""
    choices = list(choices)
    require(value in choices, key, value, "one of " + ", ".join(map(str, choices)))
