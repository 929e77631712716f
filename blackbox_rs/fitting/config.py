"""Typed configuration of :meth:`BlackBoxSmoother.fit`: one pydantic model per strategy.

* :class:`StrategyConfig` holds the settings every strategy shares (the shared machinery reads them:
  :mod:`blackbox_rs.fitting.context`, :mod:`blackbox_rs.fitting.selection` and the driver loop of
  :mod:`blackbox_rs.fitting.strategies.base`). Unknown keys are errors.
* Each strategy file defines its own subclass (``strategy: Literal["<name>"]`` plus the strategy's
  own settings) and points its strategy class at it (``config_class``).
* :data:`FitConfig` is the discriminated union on ``strategy`` over every *registered* strategy,
  built from :data:`~blackbox_rs.fitting.strategy_registry.STRATEGIES` with a pydantic
  ``TypeAdapter`` and rebuilt whenever the registry changes. ``FitConfig(**settings)`` returns the
  config of the named strategy (default ``"surrogate"``), ``isinstance(x, FitConfig)`` holds for
  every strategy config, and a setting that belongs to another strategy is a validation error that
  names the setting, the strategy and the strategy it belongs to.

This module imports no strategy at import time (a leaf, like the registry): the strategies are
imported when a config is first validated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.fitting.strategy_registry import STRATEGIES

__all__ = ["FitConfig", "StrategyConfig", "StrategyName", "config_class_for", "merge_fit_config"]

StrategyName = str
"""A registered strategy name (built in: denoise, surrogate, zeroth_order, passthrough; more with
:func:`blackbox_rs.fitting.strategies.register_strategy`)."""

DEFAULT_STRATEGY = "surrogate"
_KNOWN_WEIGHTS = ("classification", "mse", "stability")
_DEVICE_TYPES = ("cpu", "cuda", "mps")


class StrategyConfig(BaseModel):
    """Settings every fit strategy shares. Defaults suit small images (28×28, 32×32) on a CPU; ``device``
    says where the fit runs (:func:`blackbox_rs.fitting.context.fit_device`).

    Query cost shared by every strategy that queries (the strategy's own configs state the rest):
    ``clean_queries`` clean labels once (at most the number of fit images), and
    ``score_images * score_draws`` per scoring round, one when its own steps begin (the
    MSE-pretrained module), one every ``score_every`` steps and one after the last step. The fit keeps
    the best-scoring module state (:mod:`blackbox_rs.fitting.selection`; with several sigmas: the
    state whose worst sigma gained most over the pretrained module). After ``patience`` rounds in a
    row whose gain over the best round so far is not significant (a one-sided paired test at level
    ``gain_alpha``), the fit stops early: ``FitReport.stopped == "no_gain"``, the best state is kept
    and ``FitReport.queries_saved`` says what the cap left unspent (``patience=0``: never). Before the
    full fit a *pilot* at a smaller scale spends at most ``pilot`` of the cap to learn whether the steps
    help at all (:mod:`blackbox_rs.fitting.pilot`). A strategy that never queries (``denoise``) ignores
    the query-paid settings.
    """

    model_config = ConfigDict(extra="forbid")

    strategy: StrategyName = Field(description="the registered strategy these settings are for")
    steps: int = Field(default=600, ge=0, description="optimisation steps of the strategy itself, after pretraining")
    pretrain_steps: int = Field(default=600, ge=0, description="MSE denoising steps first (zero queries)")
    batch_size: int = Field(default=64, ge=1, description="clean images per MSE or gradient step")
    noise_draws: int = Field(default=1, ge=1, description="noise draws per image per step")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate of the module steps after pretraining")
    pretrain_lr: float | None = Field(default=None, gt=0,
                                      description="Adam learning rate of MSE pretraining (None: lr)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="per phase (pretraining, then the strategy's steps): constant, or cosine decay from the "
        "phase's learning rate to 5% of it at the phase's last step",
    )
    clean_fraction: float = Field(default=0.1, ge=0, lt=1,
                                  description="share of un-noised inputs in the training mix (0 <= f < 1)")
    weights: dict[str, float] = Field(
        default_factory=lambda: {"mse": 1.0, "stability": 1.0},
        description="objective weights by term (mse, stability, classification); each >= 0, at least one > 0",
    )
    seed: int = Field(default=0, ge=0, description="seed of every random draw of the fit (batches, noise, subsets)")
    checkpoint_every: int = Field(default=50, ge=1, description="steps between fit checkpoints (with checkpoint_dir)")
    # black-box labels (read by the shared FitContext)
    clean_queries: int = Field(default=10_000, ge=0,
                               description="most clean images labelled by the black box (queries, once)")
    # selection of the kept module state (query-paid; see blackbox_rs.fitting.selection)
    score_images: int = Field(default=256, ge=1, description="images of the fixed scoring set (labelled subset)")
    score_draws: int = Field(default=8, ge=1, description="noise draws per scoring image (queries per image per round)")
    score_every: int = Field(default=150, ge=1, description="strategy steps between scoring rounds")
    # stop paying when the rounds show no gain (query-paid; see blackbox_rs.fitting.selection.gain_test)
    patience: int = Field(
        default=2, ge=0,
        description="scoring rounds in a row (after the pretrained module's round) without a significant gain "
        "over the best state so far before a query-paid fit stops (stopped='no_gain', best state kept); "
        "0: never stop early",
    )
    gain_alpha: float = Field(
        default=0.1, gt=0, le=0.5,
        description="level of the one-sided paired test (per-image scores, same images and noise) that a "
        "round gained over the best so far; with several sigmas every sigma must gain",
    )
    pilot: float = Field(
        default=0.1, ge=0, le=0.5,
        description="share of the fit's query cap a pilot may spend first: the same strategy at a smaller "
        "scale for `patience` scoring rounds; no significant gain: the fit stops there (stopped='no_gain'), "
        "else the full fit runs as without a pilot, reusing the pilot's clean labels "
        "(blackbox_rs.fitting.pilot); 0: no pilot",
    )
    # where the fit runs (resolved once by the FitContext: blackbox_rs.fitting.context.fit_device)
    device: str | None = Field(
        default=None,
        description="where the module, surrogate and training batches live ('cpu', 'cuda', 'cuda:N', 'mps'); "
        "None: the connector's device when it is a local torch model (its `device` attribute), else CPU",
    )

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, v: Any) -> Any:
        """A torch device string (a ``torch.device`` is taken as its string). Whether this process can
        use it (CUDA present) is checked when the fit starts, before any query
        (:func:`~blackbox_rs.fitting.context.fit_device`), so a config stays portable."""
        if v is None:
            return None
        if isinstance(v, torch.device):
            v = str(v)
        if not isinstance(v, str):
            raise ValueError(f"device must be a torch device string ('cpu', 'cuda', 'cuda:N'), got {type(v).__name__}")
        try:
            dev = torch.device(v)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"device={v!r} is not a torch device (use 'cpu', 'cuda' or 'cuda:N')") from None
        if dev.type not in _DEVICE_TYPES:
            raise ValueError(f"device={v!r}: a fit runs on {', '.join(_DEVICE_TYPES)}, not {dev.type!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _own_settings(cls, data: Any) -> Any:
        """A key that is no field of this strategy is an error naming the strategy(ies) it belongs to."""
        if isinstance(data, Mapping):
            foreign = [k for k in data if k not in cls.model_fields]
            if foreign:
                msg = "; ".join(_foreign_message(str(k), cls) for k in foreign)
                raise PydanticCustomError("foreign_setting", "{message}", {"message": msg})
        return data

    @model_validator(mode="after")
    def _weights(self) -> StrategyConfig:
        unknown = set(self.weights) - set(_KNOWN_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown objective weight(s) {sorted(unknown)}; known: {list(_KNOWN_WEIGHTS)}")
        if any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            raise ValueError("objective weights must be >= 0 with at least one > 0")
        return self


def _literal_name(config_class: type[BaseModel]) -> str | None:
    """The strategy name a config class is bound to: the one value of its ``strategy`` Literal."""
    field = config_class.model_fields.get("strategy")
    if field is None or get_origin(field.annotation) is not Literal:
        return None
    args = get_args(field.annotation)
    return args[0] if len(args) == 1 and isinstance(args[0], str) and field.default == args[0] else None


def config_class_for(name: str, strategy_class: type) -> type[StrategyConfig]:
    """The config class of strategy ``strategy_class`` registered as ``name``.

    A class with its *own* ``config_class`` (set in its body) must point at a :class:`StrategyConfig`
    subclass whose ``strategy`` is ``Literal[name]`` with default ``name``; otherwise
    :class:`InvalidParameterError` names the mismatch. A class without one gets a generated subclass
    of the config it inherits (:class:`StrategyConfig` for a direct :class:`Strategy` subclass) whose
    ``strategy`` is ``Literal[name]``."""
    own = strategy_class.__dict__.get("config_class")
    if own is not None:
        if not (isinstance(own, type) and issubclass(own, StrategyConfig)):
            raise InvalidParameterError(
                f"strategy {name!r}: config_class must be a StrategyConfig subclass, got {own!r}")
        bound = _literal_name(own)
        if bound != name:
            raise InvalidParameterError(
                f"strategy {name!r}: its config_class {own.__qualname__} declares strategy "
                f"{bound!r}; it must be strategy: Literal[{name!r}] = {name!r}")
        return own
    parent = getattr(strategy_class, "config_class", None)
    if not (isinstance(parent, type) and issubclass(parent, StrategyConfig)):
        parent = StrategyConfig
    generated: type[StrategyConfig] = create_model(  # type: ignore[call-overload]
        f"{getattr(strategy_class, '__name__', 'Strategy')}Config",
        __base__=parent,
        __module__=getattr(strategy_class, "__module__", __name__),
        __doc__=parent.__doc__,
        strategy=(Literal[name], Field(default=name, description="the registered strategy these settings are for")),
    )
    return generated


def _registered_config(name: str) -> type[StrategyConfig]:
    """The config class of registered strategy ``name`` (imports a lazy entry)."""
    cls = STRATEGIES.get(name)
    cfg = getattr(cls, "config_class", None)
    if not (isinstance(cfg, type) and issubclass(cfg, StrategyConfig)) or _literal_name(cfg) != name:
        # registered without register_strategy (STRATEGIES.register): bind it now, once
        cfg = config_class_for(name, cls)
        cls.config_class = cfg
    return cfg


def _foreign_message(key: str, cls: type[StrategyConfig]) -> str:
    owners = []
    for name in STRATEGIES:
        try:
            if key in _registered_config(name).model_fields:
                owners.append(name)
        except Exception:  # noqa: BLE001 - an entry that cannot be imported owns nothing here
            continue
    here = _literal_name(cls) or cls.__name__
    if owners:
        return f"{key} is not a setting of strategy {here!r}; it belongs to {', '.join(map(repr, owners))}"
    return f"{key} is not a setting of strategy {here!r} (unknown name; its settings: {', '.join(cls.model_fields)})"


_adapter: tuple[tuple[tuple[str, int], ...], TypeAdapter[Any]] | None = None


def _union_adapter() -> TypeAdapter[Any]:
    """The discriminated union over the registered strategies' configs (rebuilt when they change)."""
    global _adapter
    members = [_registered_config(name) for name in STRATEGIES]
    key = tuple((_literal_name(m) or "", id(m)) for m in members)
    if _adapter is None or _adapter[0] != key:
        if not members:
            raise InvalidParameterError("no fit strategy is registered")
        union: Any = members[0] if len(members) == 1 else Annotated[Union[tuple(members)], Field(discriminator="strategy")]  # noqa: UP007
        _adapter = (key, TypeAdapter(union, config=ConfigDict(title="FitConfig")))
    return _adapter[1]


def _unknown_strategy(name: Any) -> ValidationError:
    return ValidationError.from_exception_data("FitConfig", [{
        "type": PydanticCustomError("unknown_strategy", "unknown strategy {name}; registered: {known}",
                                    {"name": repr(name), "known": str(sorted(STRATEGIES))}),
        "loc": ("strategy",), "input": name,
    }])


class _FitConfigMeta(type):
    """``FitConfig(**settings)`` validates; ``isinstance(x, FitConfig)`` holds for any strategy config."""

    def __call__(cls, **data: Any) -> StrategyConfig:  # type: ignore[override]
        return cls.validate(data)  # type: ignore[attr-defined, no-any-return]

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, StrategyConfig)

    def __subclasscheck__(cls, sub: type) -> bool:
        return isinstance(sub, type) and issubclass(sub, StrategyConfig)


class FitConfig(metaclass=_FitConfigMeta):
    """How to fit the input module: the discriminated union on ``strategy`` of every registered
    strategy's config (see the module docstring).

    ``FitConfig(**settings)`` / :meth:`validate` return that strategy's config (a
    :class:`StrategyConfig` subclass; ``strategy`` defaults to ``"surrogate"``) or raise a pydantic
    ``ValidationError`` (a ``ValueError``): an unregistered strategy, a setting of another strategy
    ("zo_lr is not a setting of strategy 'surrogate'; it belongs to 'zeroth_order'"), an unknown
    setting or an invalid value. :meth:`json_schema` describes every registered strategy.

    Query cost (black-box images) per strategy, before the budget caps it: see
    :class:`StrategyConfig` (clean labels and scoring rounds) and the config of each strategy
    (``DenoiseConfig``: 0; ``SurrogateConfig``: distillation rounds; ``ZerothOrderConfig``: gradient
    estimates; ``PassthroughConfig``: differentiable forwards).
    """

    @staticmethod
    def validate(data: Mapping[str, Any] | StrategyConfig) -> StrategyConfig:
        """The config of ``data["strategy"]`` (default ``"surrogate"``) validated from ``data``; a
        strategy config is returned as it is."""
        if isinstance(data, StrategyConfig):
            return data
        settings = dict(data)
        name = settings.setdefault("strategy", DEFAULT_STRATEGY)
        if name not in STRATEGIES:
            raise _unknown_strategy(name)
        return _union_adapter().validate_python(settings)  # type: ignore[no-any-return]

    model_validate = validate

    @staticmethod
    def json_schema() -> dict[str, Any]:
        """The JSON schema of the union (one ``oneOf`` member per registered strategy)."""
        return _union_adapter().json_schema()

    @staticmethod
    def config_class(name: str) -> type[StrategyConfig]:
        """The config class of registered strategy ``name``."""
        if name not in STRATEGIES:
            raise _unknown_strategy(name)
        return _registered_config(name)

    @staticmethod
    def merge(config: StrategyConfig | Mapping[str, Any] | None = None, strategy: str | None = None,
              **overrides: Any) -> StrategyConfig:
        """See :func:`merge_fit_config`."""
        return merge_fit_config(config, strategy, overrides)


def merge_fit_config(config: StrategyConfig | Mapping[str, Any] | None, strategy: str | None,
                     overrides: Mapping[str, Any]) -> StrategyConfig:
    """``config`` with ``overrides`` applied and, if given, its strategy replaced by ``strategy``.

    A mapping is a set of explicit settings. Of a strategy config, the settings the user set
    (``model_fields_set``) are carried; everything else takes the (new) strategy's defaults, so a
    change of strategy carries the shared settings and drops the old strategy's own defaults. An
    explicit setting (in ``config`` or ``overrides``) that the resulting strategy lacks is a
    ``ValidationError`` naming it and the strategy it belongs to."""
    if isinstance(config, StrategyConfig):
        data = {k: getattr(config, k) for k in config.model_fields_set}
        data["strategy"] = config.strategy
    else:
        data = dict(config or {})
    data.update(overrides)
    if strategy:
        data["strategy"] = strategy
    return FitConfig.validate(data)
