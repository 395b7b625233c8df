"""Run-time configuration per provider: defaults from the settings, overridden through the control API."""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

PROVIDERS = ("runway", "veo", "replicate")
CURVES = ("linear", "ease_out")

# How long output URLs stay valid: Runway's signed URLs last 24-48 h, Replicate deletes files after 1 h.
# Veo answers with the bytes themselves, so its value only matters for outputs written to storageUri.
_OUTPUT_TTL_SECONDS = {"runway": 24 * 3600.0, "veo": 3600.0, "replicate": 3600.0}
# Replicate stops a run after 30 minutes; the others publish no such limit.
_MAX_RUN_SECONDS = {"runway": None, "veo": None, "replicate": 1800.0}

# List prices per second of video, in each provider's unit: Runway credits (1 credit = 0.01 USD), else
# USD. They must equal the renderers' own (services/renderers/*/provider.py, AIPROD_REPLICATE_PRICE_PER_
# SECOND_USD) so that a renderer's charge and the sandbox's bill agree to the micro-dollar; a test
# compares them. Where a model prices audio apart, `prices` is with audio and `silent_prices` without.
_PRICES: dict[str, dict[str, float]] = {
    "runway": {"gen4.5": 12, "gen4_turbo": 5, "veo3.1": 40, "veo3.1_fast": 15},
    "veo": {
        "veo-3.0-generate-001": 0.40,
        "veo-3.0-fast-generate-001": 0.15,
        "veo-3.1-generate-001": 0.40,
        "veo-3.1-fast-generate-001": 0.15,
        "veo-3.1-lite-generate-001": 0.05,
        "veo-3.1-generate-preview": 0.40,
        "veo-3.1-fast-generate-preview": 0.15,
    },
    "replicate": {"minimax/video-01": 0.05},
}
_SILENT_PRICES: dict[str, dict[str, float]] = {
    "runway": {"veo3.1": 20, "veo3.1_fast": 10},
    "veo": {
        "veo-3.0-generate-001": 0.20,
        "veo-3.0-fast-generate-001": 0.10,
        "veo-3.1-generate-001": 0.20,
        "veo-3.1-fast-generate-001": 0.10,
        "veo-3.1-lite-generate-001": 0.05,
        "veo-3.1-generate-preview": 0.20,
        "veo-3.1-fast-generate-preview": 0.10,
    },
    "replicate": {},
}
# Replicate: the price per output second of a model missing from `prices`. The Replicate renderer
# charges its AIPROD_REPLICATE_PRICE_PER_SECOND_USD (0.05 by default) whatever the model: the same here.
_DEFAULT_PRICE: dict[str, float | None] = {"runway": None, "veo": None, "replicate": 0.05}
# A control request sets prices for the provider it names only: each provider counts in its own unit.
_PRICE_KEYS = ("prices", "silent_prices", "default_price")
# A control request's mapping is merged into the current one: setting one model's price keeps the others'.
_MAPPING_KEYS = ("prices", "silent_prices")


class ConfigError(ValueError):
    """A control request with an unknown key or a value out of range."""


@dataclass(frozen=True)
class ProviderConfig:
    """How one provider's simulated tasks behave."""

    # Wall time from RUNNING to done.
    render_seconds: float
    output_ttl_seconds: float
    # Tasks running at once; those over the limit wait (THROTTLED, starting, not done). None: no limit;
    # 0: none runs (a provider holding every task queued until the limit is raised).
    max_concurrent: int | None = None
    # How long `[sandbox:throttle]` holds a task before it may run.
    throttle_seconds: float = 2.0
    # Progress against the elapsed share of render_seconds.
    progress_curve: str = "linear"
    # Runs longer than this fail as timed out (Replicate's 30 minutes). None: no limit.
    max_run_seconds: float | None = None
    # Replicate: the models that exist, as owner/name. None: any owner/name exists.
    models: tuple[str, ...] | None = None
    # Replicate: the output as a one-element list of URLs instead of one URL, as some models answer.
    output_as_list: bool = False
    # Price per second of video per model, with audio where it is priced apart (see _PRICES).
    prices: dict[str, float] = field(default_factory=dict)
    # Price per second without audio, for the models that price audio apart.
    silent_prices: dict[str, float] = field(default_factory=dict)
    # Replicate: the price per second of a model missing from `prices`.
    default_price: float | None = None

    def price(self, model: str, *, audio: bool = True) -> float:
        """The price per second of a model's video; 0 for a model with no price and no default."""
        if not audio and model in self.silent_prices:
            return self.silent_prices[model]
        return self.prices.get(model, self.default_price or 0.0)


def _number(minimum: float, *, allow_zero: bool = True) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected a number, got {value!r}")
        if value < minimum or (not allow_zero and value == 0):
            raise ConfigError(f"{value} is out of range")
        return float(value)

    return convert


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"expected a non-negative integer, got {value!r}")
    return value


def _curve(value: Any) -> str:
    if value not in CURVES:
        raise ConfigError(f"progress_curve must be one of {', '.join(CURVES)}")
    return value


def _models(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(model, str) and "/" in model for model in value):
        raise ConfigError("models must be a list of owner/name strings")
    return tuple(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {value!r}")
    return value


def _number_or_int(value: Any) -> float:
    """A non-negative price, kept an int when given as one (Runway's credits are whole numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"expected a non-negative number, got {value!r}")
    return value


def _prices(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not all(isinstance(model, str) and model for model in value):
        raise ConfigError("prices must be an object of model name to price per second")
    return {model: _number_or_int(price) for model, price in value.items()}


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "render_seconds": _number(0),
    "output_ttl_seconds": _number(0, allow_zero=False),
    "max_concurrent": _optional(_count),
    "throttle_seconds": _number(0),
    "progress_curve": _curve,
    "max_run_seconds": _optional(_number(0, allow_zero=False)),
    "models": _optional(_models),
    "output_as_list": _flag,
    "prices": _prices,
    "silent_prices": _prices,
    "default_price": _optional(_number_or_int),
}
assert set(_CONVERTERS) == {each.name for each in fields(ProviderConfig)}


def default_configs(render_seconds: float) -> dict[str, ProviderConfig]:
    return {
        provider: ProviderConfig(
            render_seconds=render_seconds,
            output_ttl_seconds=_OUTPUT_TTL_SECONDS[provider],
            max_run_seconds=_MAX_RUN_SECONDS[provider],
            prices=dict(_PRICES[provider]),
            silent_prices=dict(_SILENT_PRICES[provider]),
            default_price=_DEFAULT_PRICE[provider],
        )
        for provider in PROVIDERS
    }


class RuntimeConfig:
    """The configuration in force: the defaults, with the control API's changes on top until a reset."""

    def __init__(self, defaults: dict[str, ProviderConfig]) -> None:
        self._defaults = dict(defaults)
        self._current = dict(defaults)

    def of(self, provider: str) -> ProviderConfig:
        return self._current[provider]

    def update(self, payload: object) -> None:
        """Applies `{"provider": optional, key: value, ...}`: to that provider, or to all of them."""
        if not isinstance(payload, dict):
            raise ConfigError("expected a JSON object")
        changes = dict(payload)
        provider = changes.pop("provider", None)
        if provider is not None and provider not in PROVIDERS:
            raise ConfigError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
        unknown = set(changes) - set(_CONVERTERS)
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        if provider is None and any(key in changes for key in _PRICE_KEYS):
            raise ConfigError("prices are in each provider's own unit: name the provider")
        converted = {key: _CONVERTERS[key](value) for key, value in changes.items()}
        for name in [provider] if provider else PROVIDERS:
            current = self._current[name]
            merged = {
                key: {**getattr(current, key), **converted[key]} for key in _MAPPING_KEYS if key in converted
            }
            self._current[name] = replace(current, **{**converted, **merged})

    def reset(self) -> None:
        self._current = dict(self._defaults)

    def as_json(self) -> dict[str, dict[str, Any]]:
        return {
            provider: {
                key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(config).items()
            }
            for provider, config in self._current.items()
        }
