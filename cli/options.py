"""Turn the fields of a settings dataclass into typer options, so commands share one definition."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from p2pnode.node.settings import RunSettings, build_settings


def _option(f: dataclasses.Field, hint: Any) -> tuple[object, object]:
    flag = "--" + f.name.replace("_", "-")
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    shown = ",".join(default) if isinstance(default, list) else default
    help_text = f.metadata.get("help", "") + (f" (default: {shown})" if shown not in (None, "", []) else "")
    kw = {"help": help_text, "envvar": f"P2PNODE_{f.name.upper()}", "show_default": False}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return bool | None, typer.Option(f"{flag}/--no-{flag[2:]}", **kw)
    if typing.get_origin(hint) is list:
        return list[str] | None, typer.Option(flag, **kw)
    return hint | None, typer.Option(flag, **kw)


def with_settings(cls: type[RunSettings], exclude: tuple[str, ...] = ()) -> Callable:
    """Decorator: the command gets one option per field of `cls` plus `--config FILE`, and is
    called with `settings=` the validated settings object instead."""
    hints = typing.get_type_hints(cls)

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "settings"]
        added = []
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            hint, option = _option(f, hints[f.name])
            added.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[hint, option]
                )
            )
        config = inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None, typer.Option(help="TOML file of settings (flags override it)", envvar="P2PNODE_CONFIG")
            ],
        )
        names = {p.name for p in added}

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            settings = build_settings(cls, values, kwargs.pop("config"))
            return fn(settings=settings, **kwargs)

        own_hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=own_hints.get(p.name, p.annotation)) for p in own]
        params = [*own, *added, config]
        wrapper.__signature__ = sig.replace(parameters=params, return_annotation=None)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__
        return wrapper

    return decorate
