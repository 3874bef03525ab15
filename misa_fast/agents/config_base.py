"""What the learners' configs share: a frozen dataclass whose fields are type-checked from their
annotations (so a new field needs no parser code), ``--set key=value`` parsing, and the preset a
dataset name gets."""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Literal

from misa_fast.data import registry


class ConfigBase:
    """Shared behaviour of the learners' frozen config dataclasses: every field is type-checked
    from its annotation (so a new field needs no parser code), ``replace`` validates, and
    ``apply_overrides`` parses CLI text by the field's type."""

    def __post_init__(self) -> None:
        types = self.field_types()
        for f in dataclasses.fields(self):  # type/choice checks, and list -> tuple, int -> float
            object.__setattr__(self, f.name, _coerce(types, f.name, getattr(self, f.name)))
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config key {f.name!r} must be a finite number, got {value}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses extend."""

    @classmethod
    def field_types(cls) -> dict:
        cached = cls.__dict__.get("_field_types_cache")
        if cached is None:
            cached = typing.get_type_hints(cls)
            cached = {f.name: cached[f.name] for f in dataclasses.fields(cls)}
            setattr(cls, "_field_types_cache", cached)
        return cached

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated). Unknown names raise ValueError."""
        types = self.field_types()
        unknown = [k for k in changes if k not in types]
        if unknown:
            raise ValueError(unknown_key_message(types, unknown[0]))
        coerced = {k: _coerce(types, k, v) for k, v in changes.items()}
        return dataclasses.replace(self, **coerced)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict):
        """Inverse of to_dict (lists become tuples); unknown keys raise ValueError."""
        return cls().replace(**values)


def hidden_sizes(cfg, network: str) -> tuple:
    """The hidden sizes of a learner's ``network`` ("actor" or "critic") as the learner builds them,
    whatever its config calls them: MISA's ``policy_hidden``, TD3's ``actor_hidden``, the weighted
    learner's None for its method's own (``resolved_hidden``)."""
    if hasattr(cfg, "resolved_hidden"):
        return tuple(cfg.resolved_hidden(network))
    names = ("policy_hidden", "actor_hidden") if network == "actor" else ("critic_hidden",)
    return tuple(next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), ()))


_ADROIT_TASKS = ("pen", "hammer", "door", "relocate")
_LOCOMOTION_TASKS = ("hopper", "walker", "halfcheetah", "cheetah", "ant")


def preset_name_for_env(env_name: str) -> str:
    """Map a D4RL-style dataset name (e.g. "antmaze-umaze-v0", "hopper-medium-v2") or a Minari id
    ("mujoco/hopper/medium-v0", "D4RL/door/human-v2") to a preset."""
    name = env_name.lower()
    if registry.is_minari_id(name):  # the environment is the id's middle part
        if registry.namespace_part(name) in registry.LOCOMOTION_NAMESPACES:
            return "locomotion"
        name = registry.environment_part(name)
    # antmaze before locomotion: "antmaze" contains "ant".
    if "antmaze" in name:
        return "antmaze"
    if "kitchen" in name:
        return "kitchen"
    if name.startswith("pendulum"):
        return "pendulum"
    if any(name.startswith(t) for t in _ADROIT_TASKS):
        return "adroit"
    if any(name.startswith(t) for t in _LOCOMOTION_TASKS):
        return "locomotion"
    raise ValueError(f"no preset known for environment {env_name!r}")


def apply_overrides(cfg: ConfigBase, assignments: typing.Iterable[str]) -> ConfigBase:
    """Apply CLI ``--set key=value`` strings. Values are parsed by the field's type: ints, floats
    ("3e-4"), bools (true/false/1/0/yes/no/on/off), tuples ("256,256", "256-256" or "[256, 256]"),
    choices, and "none" for optional fields. Unknown keys or bad values raise ValueError."""
    types = cfg.field_types()
    changes: dict = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        if key not in types:
            raise ValueError(unknown_key_message(types, key))
        changes[key] = _parse_text(types, key, text.strip())
    return cfg.replace(**changes)


# ---------------------------------------------------------------------------------------------------
# Parsing and validation. Types come from the annotations, so a new field needs no parser code.
def unknown_key_message(types: dict, key: str) -> str:
    close = difflib.get_close_matches(key, list(types), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def _strip_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_text(types: dict, key: str, text: str):
    tp, optional = _strip_optional(types[key])
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if tp is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected a boolean (true/false)")
        if tp is int:
            return _integer(text)
        if tp is float:
            return float(text)
        if typing.get_origin(tp) is tuple:
            parts = text.strip("[]() ").replace("-", ",").split(",")
            return tuple(_integer(p) for p in parts if p.strip())
        return text  # str and Literal: checked by _coerce
    except ValueError as err:
        raise ValueError(f"bad value {text!r} for config key {key!r}: {err}") from None


def _integer(text: str) -> int:
    as_float = float(text)  # accepts "1e6"
    if not as_float.is_integer():
        raise ValueError("expected an integer")
    return int(as_float)


def _coerce(types: dict, key: str, value):
    """Type-check (and normalise, e.g. list -> tuple, int -> float) a Python value for a field."""
    tp, optional = _strip_optional(types[key])
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key {key!r} may not be None")
    bad = ValueError(f"bad value {value!r} for config key {key!r} (expected {tp})")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise bad
        return tuple(value)
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(
                f"bad value {value!r} for config key {key!r}; choose one of {typing.get_args(tp)}"
            )
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config field type {tp} for {key!r}")  # pragma: no cover
