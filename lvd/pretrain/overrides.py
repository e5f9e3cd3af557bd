"""Recipe overrides: a YAML/JSON file and `section.field=value` settings on top of a named recipe.

Every field of the frozen recipe dataclasses (`Recipe` and its sections) has one dotted name,
`batch_size` or `crops.n_local`, the same in a file (`{"crops": {"n_local": 4}}` or a run's
`config.json`) and on the command line (`--set crops.n_local=4`). Values are parsed to the
field's declared type; an unknown name or a bad value raises `OverrideError`, one line naming
the closest valid settings. The recipe's own checks (`__post_init__`) still run on the result,
so an override can never build a recipe the named ones could not.

Order, later wins: the named recipe, then `--config`, then each `--set` left to right, then
`--batch-size` / `--distill-from` (short forms of `--set batch_size=` / `--set distill.teacher=`).
Pure functions: no argparse here; `lvd.cli.pretrain` and the Prefect flow call
`resolve_recipe`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lvd.pretrain.recipes import Recipe, get_recipe

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
MIN_BATCH = 2  # KoLeo needs a nearest neighbour in each rank's batch


class OverrideError(ValueError):
    """A recipe override names no setting, or gives a value the setting cannot take."""


# ---------------------------------------------------------------- the settings and their types


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def settings(cls: type = Recipe, prefix: str = "") -> dict[str, Any]:
    """Every dotted setting name of `cls` (nested dataclasses flattened) -> its declared type."""
    out: dict[str, Any] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out |= settings(kind, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = kind
    return out


def _sections(cls: type = Recipe) -> set[str]:
    hints = _hints(cls)
    return {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def closest(name: str, names: Iterable[str], n: int = 3) -> list[str]:
    """Valid names like `name`: whole-name matches first, then names ending like it."""
    names = sorted(names)
    found = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    last = name.rsplit(".", 1)[-1]
    tails = {nm.rsplit(".", 1)[-1]: nm for nm in names}
    for tail in difflib.get_close_matches(last, list(tails), n=n, cutoff=0.7):
        if tails[tail] not in found:
            found.append(tails[tail])
    return found[:n]


def _unknown(name: str, source: str) -> OverrideError:
    known = settings()
    if name in _sections():
        example = next(k for k in sorted(known) if k.startswith(name + "."))
        return OverrideError(f"{source}: {name!r} is a section, set one of its fields (e.g. {example}=...)")
    near = closest(name, known)
    hint = (
        f"did you mean {', '.join(near)}?"
        if near
        else (
            "valid settings are "
            + ", ".join(sorted(k for k in known if "." not in k))
            + " and SECTION.FIELD for sections "
            + ", ".join(sorted(_sections()))
        )
    )
    return OverrideError(f"{source}: unknown recipe setting {name!r}; {hint}")


# ---------------------------------------------------------------- parsing one value


def _parse_scalar(kind: type, value: Any) -> Any:
    """`value` (a string from the command line or a file, or a typed file value) as `kind`."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise ValueError(f"want true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"want an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError(f"want an integer, got {value!r}") from None
        raise ValueError(f"want an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"want a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise ValueError(f"want a number, got {value!r}") from None
        raise ValueError(f"want a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"want a string, got {value!r}")
    raise ValueError(f"settings of type {kind} cannot be overridden")


def _split_sequence(value: str) -> list[str]:
    text = value.strip()
    if text[:1] in "([" and text[-1:] in ")]":
        text = text[1:-1]
    return [part for part in (p.strip() for p in text.split(",")) if part]


def parse_value(kind: Any, value: Any) -> Any:
    """`value` as the declared type `kind`: int, float, bool, str, `X | None`, `tuple[X, ...]`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_value(inner, value)
    if origin is tuple:
        items = _split_sequence(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"want {len(args)} comma-separated values, got {value!r}")
        if args[-1] is not Ellipsis and len(items) != len(args):
            raise ValueError(f"want {len(args)} comma-separated values, got {value!r}")
        kinds = [args[0]] * len(items) if args[-1] is Ellipsis else list(args)
        return tuple(_parse_scalar(k, v) for k, v in zip(kinds, items))
    return _parse_scalar(kind, value)


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is None and hasattr(kind, "__name__"):
        return kind.__name__
    return str(kind).replace("typing.", "")


# ---------------------------------------------------------------- mappings and assignments


def parse_assignment(text: str) -> tuple[str, str]:
    """`section.field=value` -> (name, raw value); the value may itself contain '='."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise OverrideError(f"--set {text}: write SECTION.FIELD=VALUE, e.g. crops.n_local=4")
    return name.strip(), value


def flatten(mapping: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a config file) as dotted names -> values; sections must be mappings."""
    out: dict[str, Any] = {}
    sections = _sections()
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if not prefix and key in sections:
            if not isinstance(value, Mapping):
                raise OverrideError(f"{source}: {key!r} is a section and needs a mapping of its fields, got {value!r}")
            out |= flatten(value, source, prefix=f"{key}.")
        else:
            out[name] = value
    return out


def apply_overrides(recipe: Recipe, values: Mapping[str, Any], *, source: str) -> Recipe:
    """`recipe` with each dotted setting replaced by its value parsed to the field's type."""
    known = settings()
    parsed: dict[str, Any] = {}
    for name, raw in values.items():
        if name not in known:
            raise _unknown(name, source)
        try:
            parsed[name] = parse_value(known[name], raw)
        except ValueError as e:
            raise OverrideError(f"{source}: {name}={raw!r}: {e} ({_type_name(known[name])})") from None
    top = {k: v for k, v in parsed.items() if "." not in k}
    by_section: dict[str, dict[str, Any]] = {}
    for name, value in parsed.items():
        if "." in name:
            section, field = name.split(".", 1)
            by_section.setdefault(section, {})[field] = value
    try:
        sections = {s: dataclasses.replace(getattr(recipe, s), **f) for s, f in by_section.items()}
        return dataclasses.replace(recipe, **top, **sections)
    except (TypeError, ValueError) as e:
        raise OverrideError(f"{source}: {e}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping (`.json` read as JSON, anything else as YAML, a JSON superset)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise OverrideError(f"--config {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OverrideError(
            f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise OverrideError(f"--config {path}: want a mapping of settings, got {type(data).__name__}")
    return dict(data)


def resolve_recipe(
    name: str,
    *,
    config: str | Path | None = None,
    sets: Iterable[str] = (),
    batch_size: int | None = None,
    distill_from: str | None = None,
) -> Recipe:
    """The one recipe builder of `lvd pretrain` and the `pretrain` flow (order: module doc)."""
    try:
        recipe = get_recipe(name)
    except ValueError as e:
        raise OverrideError(f"--recipe: {e}") from None
    if config is not None:
        recipe = apply_overrides(
            recipe, flatten(read_config_file(config), f"--config {config}"), source=f"--config {config}"
        )
    for text in sets:
        key, value = parse_assignment(text)
        recipe = apply_overrides(recipe, {key: value}, source=f"--set {text}")
    if batch_size is not None:
        recipe = apply_overrides(recipe, {"batch_size": batch_size}, source="--batch-size")
    if distill_from is not None:
        recipe = apply_overrides(recipe, {"distill.teacher": str(distill_from)}, source="--distill-from")
    if recipe.batch_size < MIN_BATCH:
        raise OverrideError(
            f"--batch-size {recipe.batch_size}: each rank needs at least {MIN_BATCH} images per step "
            "(the KoLeo loss compares every image with its nearest neighbour in the rank's batch); "
            f"use --batch-size {MIN_BATCH} or more"
        )
    return recipe
