"""Registry of input modules: the single source of "which modules exist".

``@register_module("dncnn")`` on an :class:`~blackbox_rs.modules.base.InputModule` subclass adds it;
:func:`create_module` builds one from a name, a config object or a plain mapping;
:func:`list_modules` lists what is registered. Registration is validated: a duplicate name, or a
config class whose ``name`` literal differs from the registered name, raises
:class:`~blackbox_rs.errors.RegistryError`. An unknown name raises
:class:`~blackbox_rs.errors.UnknownModuleError` listing the known ones.

The table itself is :data:`blackbox_rs.modules.base.MODULES` (a :class:`blackbox_rs.registry.Registry`):
this file imports base, base never imports this file (so :func:`~blackbox_rs.modules.base.load_module`
finds classes without an import cycle).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from blackbox_rs.errors import ConfigError, RegistryError
from blackbox_rs.modules.base import MODULES, InputModule, ModuleConfig, validate_config

__all__ = ["create_module", "get_config_class", "get_module_class", "list_modules", "register_module"]

M = TypeVar("M", bound=type[InputModule])


def register_module(name: str) -> Callable[[M], M]:
    """Class decorator registering an :class:`InputModule` subclass under ``name``.

    Checks: ``name`` is a non-empty identifier-like string not yet registered; the class subclasses
    :class:`InputModule`; its ``config_class`` subclasses :class:`ModuleConfig` and declares
    ``name: Literal[name]``.
    """
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise RegistryError(f"module name must be a non-empty string of [A-Za-z0-9_-], got {name!r}")

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, InputModule)):
            raise RegistryError(
                f"register_module({name!r}) must decorate an InputModule subclass, got {cls!r}"
            )
        MODULES.require_free(name)  # RegistryError naming the class that holds the name
        cfg = cls.config_class
        if not (isinstance(cfg, type) and issubclass(cfg, ModuleConfig)) or cfg is ModuleConfig:
            raise RegistryError(f"{cls.__qualname__}.config_class must be a ModuleConfig subclass")
        field = cfg.model_fields.get("name")
        args = typing.get_args(field.annotation) if field is not None else ()
        if field is None or typing.get_origin(field.annotation) is not typing.Literal or args != (name,):
            raise RegistryError(
                f"{cfg.__qualname__}.name must be declared as Literal[{name!r}] = {name!r} "
                f"to register {cls.__qualname__} as {name!r}"
            )
        if field.default != name:
            raise RegistryError(f"{cfg.__qualname__}.name must default to {name!r}")
        MODULES.register(name, cls)
        return cls

    return decorator


def list_modules() -> list[str]:
    """Sorted names of every registered input module."""
    return MODULES.names()


def get_module_class(name: str) -> type[InputModule]:
    """The class registered as ``name``; :class:`UnknownModuleError` (listing known names) otherwise."""
    return MODULES.get(name)


def get_config_class(name: str) -> type[ModuleConfig]:
    """The config class of the module registered as ``name``."""
    return get_module_class(name).config_class


def create_module(name_or_config: str | ModuleConfig | Mapping[str, Any], **overrides: Any) -> InputModule:
    """Build an input module.

    ``name_or_config`` is a registered name (``create_module("dncnn", input_shape=(1, 28, 28))``), a
    config instance, or a mapping with a ``"name"`` key (e.g. parsed JSON). ``overrides`` replace
    config fields. Any invalid field raises :class:`ConfigError` naming it. The returned module is
    exactly the identity at initialisation (or exactly its fitted base, for adapter modules).
    """
    if isinstance(name_or_config, str):
        name = name_or_config
        data: dict[str, Any] = {}
    elif isinstance(name_or_config, ModuleConfig):
        name = name_or_config.name
        data = name_or_config.model_dump(mode="json")
    elif isinstance(name_or_config, Mapping):
        if "name" not in name_or_config:
            raise ConfigError(
                "module config mapping needs a 'name' key; registered: " + ", ".join(list_modules())
            )
        name = name_or_config["name"]
        data = dict(name_or_config)
    else:
        raise ConfigError(
            f"create_module expects a module name, a ModuleConfig or a mapping, got {type(name_or_config).__name__}"
        )
    if "name" in overrides and overrides["name"] != name:
        raise ConfigError(
            f"cannot override 'name' ({name!r} -> {overrides['name']!r}); create another module"
        )
    cls = get_module_class(name)
    data.update(overrides)
    data["name"] = name
    config = validate_config(cls.config_class, data, source=f"module {name!r}")
    return cls(config)
