"""Search specifications: ``configs/tune.yaml`` -> a typed :class:`TuneSpec` -> a Ray Tune
``param_space`` over dotted config keys, and back from a trial's sampled values to config overrides.

A search dimension is a dotted config key (``train.lr``) or the name of a *preset* (``augment_set``),
whose value names a group of overrides defined in the same file. Lists are searched as a grid
(``search: grid``) or sampled uniformly (``search: random``); ``{loguniform: [low, high]}``,
``{uniform: [low, high]}`` and ``{randint: [low, high]}`` are always sampled.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raypipe.config import ConfigError, _set_dotted, load_yaml, parse_override

DISTRIBUTIONS = ("loguniform", "uniform", "randint")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SchedulerSpec(_Section):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1, description="epochs every trial runs before it may be stopped; "
                              "more than the trials' train.warmup_epochs, or ASHA judges them "
                              "while their learning rate is still rising")
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(None, ge=1, description="None: the trials' train.epochs")


class TuneSpec(_Section):
    """Everything a search needs besides the base training config."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$",
                             description="None: tune-<date>-<time>; an existing name resumes")
    storage_path: str | None = Field(None, description="None: the base config's run.storage_path")
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, description="grid: repeats of the grid; random: trials")
    seed: int | None = Field(0, description="random/optuna: the same seed draws the same trials; "
                             "None = new draws every search")
    metric: Literal["val_auc", "val_loss", "val_acc", "val_balanced_acc", "val_pr_auc", "val_f1",
                    "train_loss"] = "val_auc"
    mode: Literal["max", "min"] = "max"
    subset: int | None = Field(64, ge=2, description="training images per trial; None = all")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as fit")
    scheduler: SchedulerSpec = SchedulerSpec()
    trial_overrides: list[str] = Field(
        [], description="dotted overrides for the search's trials only (e.g. fewer epochs)")
    space: dict[str, Any] = {}
    presets: dict[str, dict[str, dict[str, Any]]] = {}

    @model_validator(mode="after")
    def _check(self) -> TuneSpec:
        for key, value in self.space.items():
            if key in self.presets:
                names = value if isinstance(value, list) else [value]
                unknown = [n for n in names if n not in self.presets[key]]
                if unknown:
                    raise ValueError(
                        f"space.{key} names {unknown}, which presets.{key} does not define "
                        f"(defined: {sorted(self.presets[key])})"
                    )
            elif isinstance(value, dict):
                _check_distribution(key, value)
        return self


def _check_distribution(key: str, value: dict) -> None:
    if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise ValueError(
            f"space.{key} = {value!r}: expected a list of values or one of "
            f"{{loguniform|uniform|randint: [low, high]}}"
        )
    bounds = next(iter(value.values()))
    if not (isinstance(bounds, list) and len(bounds) == 2 and float(bounds[0]) < float(bounds[1])):
        raise ValueError(f"space.{key} = {value!r}: bounds must be [low, high] with low < high")
    if "loguniform" in value and float(bounds[0]) <= 0:
        raise ValueError(f"space.{key} = {value!r}: loguniform needs low > 0")


def load_tune_spec(path: str, overrides: list[str] = ()) -> TuneSpec:
    """Read a search spec (``configs/tune.yaml`` style), apply dotted overrides, validate."""
    tree = load_yaml(path)
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value)
    try:
        return TuneSpec.model_validate(tree)
    except ValidationError as err:
        lines = [f"invalid search spec ({path}):"]
        for e in err.errors():
            dotted = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  - {dotted} = {e.get('input')!r}: {e['msg']}.")
        lines.append(f"Valid top-level keys: {', '.join(TuneSpec.model_fields)}. Fix the file and run again.")
        raise ConfigError("\n".join(lines)) from None


def yaml_scalar(value: Any) -> str:
    """``value`` as it must appear after ``key=`` to parse back to the same value (``1e-06`` is a
    string to YAML; ``1.0e-06`` is a float)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def param_space(spec: TuneSpec) -> dict[str, Any]:
    """The Ray Tune ``param_space`` of ``spec`` (keys are the dotted names, unchanged)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, value in spec.space.items():
        if isinstance(value, dict):
            (kind, (low, high)), = value.items()
            out[key] = getattr(tune, kind)(low, high)
        elif isinstance(value, list):
            out[key] = tune.grid_search(value) if spec.search == "grid" else tune.choice(value)
        else:
            out[key] = value
    return out


def trial_overrides(params: dict[str, Any], presets: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """A trial's sampled values -> dotted ``key=value`` overrides (presets expanded, in order)."""
    out: list[str] = []
    for key, value in params.items():
        if key in presets:
            out += [f"{k}={yaml_scalar(v)}" for k, v in presets[key][value].items()]
        else:
            out.append(f"{key}={yaml_scalar(value)}")
    return out


def example_points(spec: TuneSpec) -> list[dict[str, Any]]:
    """One point per listed value of every dimension (others at their first value): enough to
    check at start-up that every key and preset builds a valid config."""
    first = {k: _first(v) for k, v in spec.space.items()}
    points = [first]
    for key, value in spec.space.items():
        if isinstance(value, list):
            points += [{**first, key: v} for v in value[1:]]
    return points


def _first(value: Any) -> Any:
    if isinstance(value, list):
        return value[0]
    if isinstance(value, dict):
        low, high = next(iter(value.values()))
        return type(low)(low) if "randint" in value else float(low)
    return value
