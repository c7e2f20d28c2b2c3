"""``--help`` for the apps: their config groups with the options each offers, and every setting of
the schema with its type, default and description (the ``help`` metadata of ``archlab/schema.py``).

Hydra prints ``hydra.help.template`` (``conf/hydra/help/*.yaml``); these resolvers fill it in.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from archlab.cli import dataclass_in

_CONF = Path(__file__).resolve().parent / "conf"
# The groups each app composes (others in conf/ belong to the other app, or to Hydra).
APP_GROUPS = {
    "train": ("model", "size", "objective", "data", "optimizer", "run", "logger", "rules", "experiment", "sweep"),
    "eval": ("data", "logger"),
    "export": (),
    "generate": (),
}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Union:
        names = [_type_name(a) for a in typing.get_args(hint) if a is not type(None)]
        return f"{' | '.join(names)} | null"
    origin = typing.get_origin(hint)
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(hint, "__name__", str(hint))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return ""
    return "required" if value == "???" else repr(value)


def setting_lines(schema: type, prefix: str = "") -> list[str]:
    """``key (type) = default: description`` for every leaf setting of ``schema``, dotted."""
    lines = []
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        hint = hints[field.name]
        nested = dataclass_in(hint)
        if nested is not None:
            if field.metadata.get("help"):
                lines.append(f"  {prefix}{field.name}: {field.metadata['help']} (null by default)")
            lines += setting_lines(nested, f"{prefix}{field.name}.")
            continue
        default = _default(field)
        text = field.metadata.get("help", "")
        lines.append(f"  {prefix}{field.name} ({_type_name(hint)}) = {default}" + (f": {text}" if text else ""))
    return lines


def _settings_help(app: str) -> str:
    from archlab.trainer import APPS

    schema = APPS[app]
    return "\n".join(setting_lines(schema)).replace("$", "$$")  # Hydra's template is a string.Template


def _groups_help(app: str) -> str:
    lines = []
    for group in APP_GROUPS[app]:
        options = sorted(p.stem for p in (_CONF / group).glob("*.yaml"))
        if group == "model":  # the reference architectures are registered in code (ConfigStore)
            from archlab.config import PRESETS

            options = sorted({*options, *PRESETS})
        lines.append(f"  {group}: {', '.join(options)}")
    return "\n".join(lines)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("archlab.settings_help"):
        OmegaConf.register_new_resolver("archlab.settings_help", _settings_help)
    if not OmegaConf.has_resolver("archlab.groups_help"):
        OmegaConf.register_new_resolver("archlab.groups_help", _groups_help)
