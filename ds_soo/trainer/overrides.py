"""Raw config text: a YAML file and ``section.key=value`` command-line overrides, merged into one dict.

Values are parsed as YAML so ``0.1``, ``true`` and ``[0.9, 0.95]`` arrive typed; ``1e-3`` (which plain
YAML 1.1 reads as a string) is accepted as a float because that is how people write learning rates.
"""

from __future__ import annotations

import copy
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ds_soo.config import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; accept exponent floats without a dot, as users write lrs."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_raw(path: str | os.PathLike | None) -> dict[str, Any]:
    """Read a YAML config into a plain dict (an empty one when no file is given)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: {p} does not exist")
    try:
        raw = yaml_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {p} is not valid YAML: {e}") from e
    if raw is None:
        raise ConfigError(f"--config: {p} is empty; give it at least one section (e.g. train:, optim:)")
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {p} must hold a mapping, got {type(raw).__name__}")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value), the value parsed as YAML so ``0.1``/``true``/``[1, 2]`` type."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        return key, yaml_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: {value!r} is not a YAML value: {e}") from e


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted keys set; missing intermediate sections are created."""
    out = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section, cannot set {key}")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return out


def _list_typed(key: str) -> bool:
    """Whether the option ``key`` itself holds a list (``optim.betas``, ``precond.exclude``)."""
    import dataclasses
    import typing

    from ds_soo.config import PreconditionerConfig
    from ds_soo.trainer.config import TrainConfig

    parts = key.split(".")
    cls: Any = TrainConfig
    if parts[0] == "precond":
        cls, parts = PreconditionerConfig, parts[1:]
    for i, part in enumerate(parts):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return False
        hint = typing.get_type_hints(cls).get(part)
        if hint is None:
            return False
        if i == len(parts) - 1:
            options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            return any(typing.get_origin(o) in (list, tuple) or o in (list, tuple) for o in options)
        cls = hint
    return False


def sweep_values(key: str, value: Any) -> list[Any] | None:
    """The values to sweep when ``key=value`` is a grid axis, else None.

    A list sweeps (``optim.lr=[1e-3,3e-3]``); for an option that is itself a list, a list of lists
    sweeps (``optim.betas=[[0.9,0.99],[0.9,0.999]]``) and a plain list is one value.
    """
    if not isinstance(value, list):
        return None
    if _list_typed(key):
        return value if value and all(isinstance(v, list) for v in value) else None
    if not value:
        raise ConfigError(f"override {key}=[] sweeps over no values")
    return value


def expand_grid(overrides: Sequence[str]) -> list[list[str]]:
    """Every combination of the swept overrides, as override strings; one combination when none sweeps.

    Axes vary in command-line order, the last fastest: ``a=[1,2] b=[3,4]`` gives (1,3), (1,4), (2,3), (2,4).
    """
    import itertools
    import json

    axes: list[list[str]] = []
    for text in overrides:
        key, value = parse_override(text)
        values = sweep_values(key, value)
        axes.append([text] if values is None else [f"{key}={json.dumps(v)}" for v in values])
    return [list(combo) for combo in itertools.product(*axes)]


def swept_keys(overrides: Sequence[str]) -> list[str]:
    """The keys of the overrides that sweep (for naming runs)."""
    return [k for k, v in map(parse_override, overrides) if sweep_values(k, v) is not None]
