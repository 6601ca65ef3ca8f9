"""Meta-training configuration: one flat dataclass, named presets, ``key=value`` overrides.

Every number of the recipe (spec section 3) is a field here so that a run
folder's ``config.json`` says exactly what was trained, and every field can be
changed from the command line with ``--set key=value``. The rule being trained
is the nested field ``variant`` (a :class:`celo2.rule.variant.RuleVariant`,
default the published rule), changed field by field with
``--set variant.hidden_width=4`` or whole with ``--set 'variant={"rms_decay": 0.999}'``
(fields left out keep the published values).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Mapping

from celo2.rule import spec
from celo2.rule.variant import PUBLISHED, RuleVariant, VariantError, parse_field

AUGMENTATIONS = ("none", "global", "tensor", "parameter")
INNER_OPTIMIZERS = ("celo2", "celo2-base", "adam")
METRICS_FORMATS = ("jsonl", "csv")
#: The largest seed accepted (seeds are ``[0, 2**32)``: what NumPy, PyTorch and JAX all take).
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A bad preset name, override key or value; the message names it."""


@dataclass(frozen=True)
class MetaTrainConfig:
    """All settings of a PES meta-training run (defaults: the published recipe)."""

    # --- tasks --------------------------------------------------------------
    tasks: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "svhn")
    """Task families (names in :mod:`celo2.metatrain.tasks`); one MLP task each."""
    data_dir: str | None = None
    """Folder with the downloaded datasets (else ``$CELO2_DATA_DIR``)."""
    image_size: int = 8
    hidden_sizes: tuple[int, ...] = (32,)
    num_classes: int = 10
    batch_size: int = 64

    # --- inner runs ---------------------------------------------------------
    inner_optimizer: str = "celo2"
    """``celo2``: the learned rule (``celo2.optax.celo2``) on the weights, AdamW on the
    biases; ``celo2-base``: the rule without Newton-Schulz on every tensor;
    ``adam``: ignores theta (checks the machinery; its PES gradient is zero)."""
    inner_lr: float = 1e-3
    adam_lr_mult: float = spec.ADAM_LR_MULT
    inner_weight_decay: float = 0.0
    min_unroll_length: int = 100
    max_unroll_length: int = 2000
    """Inner-run lengths are drawn log-uniform in ``[min, max]``."""
    initial_offset_max: int = 2000
    """First runs start at a step drawn in ``[0, initial_offset_max)`` to desynchronise resets."""
    augmentation: str = "global"
    """Reparametrisation level: ``none``, ``global`` (one scale per run), ``tensor``, ``parameter``."""
    reparam_scale_min: float = 1e-3
    reparam_scale_max: float = 1e3

    # --- PES ----------------------------------------------------------------
    pairs_per_task: int = 8
    perturbation_std: float = 0.01
    truncation_length: int = 50
    meta_loss_clip: float = 1.5 * math.log(10.0)
    """Each per-step training loss is clipped to ``[0, meta_loss_clip]``; non-finite -> clip."""

    # --- outer optimiser ----------------------------------------------------
    iterations: int = 100_000
    outer_lr: float = 1e-4
    outer_b1: float = 0.9
    outer_b2: float = 0.999
    outer_eps: float = 1e-8
    outer_weight_decay: float = 1e-4
    seed: int = 0
    theta_init: str | None = None
    """``None``: ``Theta.init(seed)``; else a theta file to start from."""

    # --- bookkeeping --------------------------------------------------------
    checkpoint_every: int = 1000
    metrics_format: str = "jsonl"
    shard: bool = True
    """Lay particles out over all JAX devices (``NamedSharding`` over a 1-D mesh)."""
    preset: str = "custom"

    # --- the rule -----------------------------------------------------------
    variant: RuleVariant = PUBLISHED
    """The rule variant meta-trained (default the published rule); a mapping of its fields is accepted."""

    # ------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if isinstance(self.variant, Mapping):
            try:
                object.__setattr__(self, "variant", RuleVariant.from_dict(self.variant))
            except VariantError as exc:
                raise ConfigError(f"meta-train config: variant: {exc}") from None
        self.validate()

    def validate(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"meta-train config: {key}={getattr(self, key)!r}: {why}")

        if not isinstance(self.variant, RuleVariant):
            raise bad("variant", "must be a RuleVariant or a mapping of its fields")
        if not self.tasks:
            raise bad("tasks", "give at least one task family")
        from celo2.metatrain.tasks import task_families

        known = task_families()
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise bad("tasks", f"unknown task family {unknown[0]!r}; known: {', '.join(sorted(known))} "
                      "(add one with celo2.metatrain.register_task_family)")
        if len(set(self.tasks)) != len(self.tasks):
            raise bad("tasks", "a task family is listed twice")
        for f in fields(self):
            value = getattr(self, f.name)
            if str(f.type) == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise bad(f.name, "must be an integer")
            if str(f.type) == "float":
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise bad(f.name, "must be a number")
                if not math.isfinite(value):
                    raise bad(f.name, "must be a finite number")
        for key in ("image_size", "num_classes", "batch_size", "pairs_per_task",
                    "truncation_length", "iterations", "checkpoint_every",
                    "min_unroll_length", "max_unroll_length"):
            if int(getattr(self, key)) < 1:
                raise bad(key, "must be a positive integer")
        if any(isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1 for h in self.hidden_sizes):
            raise bad("hidden_sizes", "sizes must be positive integers")
        if self.initial_offset_max < 0:
            raise bad("initial_offset_max", "must be >= 0")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"must be in [0, {MAX_SEED}] (2**32 - 1)")
        if self.max_unroll_length < self.min_unroll_length:
            raise bad("max_unroll_length", f"must be >= min_unroll_length={self.min_unroll_length}")
        if self.min_unroll_length < self.truncation_length:
            # One fresh inner state is drawn per truncation; a run shorter than a
            # truncation would need two resets inside one.
            raise bad("min_unroll_length", f"must be >= truncation_length={self.truncation_length}")
        if self.augmentation not in AUGMENTATIONS:
            raise bad("augmentation", f"choose one of {', '.join(AUGMENTATIONS)}")
        if not 0 < self.reparam_scale_min <= self.reparam_scale_max:
            raise bad("reparam_scale_min", "need 0 < reparam_scale_min <= reparam_scale_max")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise bad("inner_optimizer", f"choose one of {', '.join(INNER_OPTIMIZERS)}")
        if self.metrics_format not in METRICS_FORMATS:
            raise bad("metrics_format", f"choose one of {', '.join(METRICS_FORMATS)}")
        for key in ("perturbation_std", "outer_lr", "inner_lr", "meta_loss_clip", "outer_eps"):
            if not float(getattr(self, key)) > 0:
                raise bad(key, "must be > 0")
        for key in ("adam_lr_mult", "inner_weight_decay", "outer_weight_decay"):
            if not float(getattr(self, key)) >= 0:
                raise bad(key, "must be >= 0")
        for key in ("outer_b1", "outer_b2"):
            if not 0 <= float(getattr(self, key)) < 1:
                raise bad(key, "must be in [0, 1)")

    # ------------------------------------------------------------------------
    @property
    def num_pairs(self) -> int:
        return len(self.tasks) * self.pairs_per_task

    @property
    def num_particles(self) -> int:
        return 2 * self.num_pairs

    @property
    def inner_steps_per_iteration(self) -> int:
        """Spec accounting: tasks x pairs x 2 x truncation length."""
        return self.num_particles * self.truncation_length

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-able values (tuples as lists, ``variant`` as the mapping of its fields)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        out["variant"] = self.variant.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MetaTrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"meta-train config: unknown key(s) {', '.join(unknown)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "MetaTrainConfig":
        return override(self, changes)


# --- presets --------------------------------------------------------------------
BYTE_META_LOSS_CLIP = 1.5 * math.log(256.0)
"""The meta-loss clip for next-byte prediction: 1.5 times the loss of a uniform guess over 256 bytes,
as the default ``1.5 ln 10`` is for 10 classes (a byte model starts at ``ln 256 = 5.5``, above
``1.5 ln 10 = 3.5``, where every loss would be clipped and PES would see no signal)."""

PRESETS: dict[str, dict[str, Any]] = {
    # The published recipe: 4 x 8 x 2 x 50 = 3,200 inner steps per iteration.
    "paper": {},
    # Sized for 2 CPU cores (two host devices): 4 x 4 x 2 x 50 = 1,600 inner steps per iteration,
    # so that 10,000 iterations fit in about an hour with room for a busier machine
    # (docs/performance.md, "Measurements behind design choices"). Half the paper's pairs and the predecessor's outer learning rate buy more,
    # noisier outer steps in the time.
    "cpu": {
        "tasks": ("mnist", "fashion-mnist", "digits", "synthetic"),
        "pairs_per_task": 4,
        "iterations": 10_000,
        "outer_lr": 3e-4,
        "checkpoint_every": 500,
    },
    # The cpu preset with families built from real photographs (celo2.data.photos, scikit-image)
    # in place of the generated stand-ins digits and synthetic: photo-patches for CIFAR-10,
    # photo-faces for SVHN.
    "cpu-photos": {
        "tasks": ("mnist", "fashion-mnist", "photo-patches", "photo-faces"),
        "pairs_per_task": 4,
        "iterations": 10_000,
        "outer_lr": 3e-4,
        "checkpoint_every": 500,
    },
    # The tiny causal byte transformer on the standard library's docstrings, one family:
    # 1 x 4 x 2 x 50 = 400 inner steps per iteration. Batches of 8 windows of 32 bytes keep
    # the inner step small enough that 2,000 iterations fit in about an hour on 2 CPU cores.
    "cpu-text": {
        "tasks": ("text-docstrings",),
        "batch_size": 8,
        "pairs_per_task": 4,
        "meta_loss_clip": BYTE_META_LOSS_CLIP,
        "iterations": 2_000,
        "outer_lr": 3e-4,
        "checkpoint_every": 250,
    },
    # The small conv net on images the bench never evaluates: 3 x 4 x 2 x 50 = 1,200 inner steps
    # per iteration. The photo families need scikit-image (pip install 'celo2[photos]').
    "cpu-conv": {
        "tasks": ("conv-synthetic", "conv-photo-patches", "conv-photo-faces"),
        "pairs_per_task": 4,
        "iterations": 5_000,
        "outer_lr": 3e-4,
        "checkpoint_every": 500,
    },
    # Under a minute, mostly compilation: checks the pipeline end to end on built-in data.
    "smoke": {
        "tasks": ("digits", "synthetic"),
        "pairs_per_task": 2,
        "truncation_length": 5,
        "min_unroll_length": 10,
        "max_unroll_length": 40,
        "initial_offset_max": 40,
        "iterations": 3,
        "checkpoint_every": 2,
    },
}


def preset(name: str, **overrides: Any) -> MetaTrainConfig:
    """The named preset (``paper``, ``cpu``, ``cpu-photos``, ``cpu-text``, ``cpu-conv``, ``smoke``) with ``overrides`` applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown meta-train preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name], preset=name)
    values.update(overrides)
    return override(MetaTrainConfig(), values)


def _coerce(key: str, text: Any, current: Any, annotation: str) -> Any:
    """Turn a ``--set`` string into the field's type."""
    if not isinstance(text, str):
        if "tuple" in annotation and isinstance(text, list):
            return tuple(text)
        return text
    raw = text.strip()
    try:
        if annotation.startswith("tuple[str"):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if annotation.startswith("tuple[int"):
            return tuple(int(p) for p in raw.split(",") if p.strip())
        if annotation == "bool":
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if annotation == "int":
            # "1e3" is 1000; digits are read exactly, so 2**64 and beyond stay what was typed.
            return int(raw) if raw.lstrip("+-").isdigit() else (
                int(float(raw)) if float(raw).is_integer() else int(raw))
        if annotation == "float":
            value = float(raw)
            if not math.isfinite(value):  # named as typed: "1e400" reads as inf
                raise ConfigError(f"meta-train config: {key}={text!r}: must be a finite number")
            return value
        if "None" in annotation and raw.lower() in ("none", "null", ""):
            return None
        return raw
    except (ValueError, OverflowError) as exc:
        raise ConfigError(f"meta-train config: {key}={text!r}: not a valid {annotation} ({exc})") from None


VARIANT_PREFIX = "variant."
"""``--set variant.FIELD=VALUE`` changes one field of the rule variant."""


def _variant_value(value: Any) -> RuleVariant:
    """``variant=...`` as given: a :class:`RuleVariant`, a mapping of fields, JSON text of one, or ``published``."""
    if isinstance(value, RuleVariant):
        return value
    try:
        if isinstance(value, str):
            if value.strip().lower() in ("published", "default", ""):
                return PUBLISHED
            return RuleVariant.from_json(value, origin=f"variant={value!r}")
        if isinstance(value, Mapping):
            return RuleVariant.from_dict(value)
    except VariantError as exc:
        raise ConfigError(f"meta-train config: {exc}") from None
    raise ConfigError(f"meta-train config: variant={value!r}: expected 'published', a JSON object of "
                      "rule variant fields, or --set variant.FIELD=VALUE")


def override(config: MetaTrainConfig, changes: Mapping[str, Any]) -> MetaTrainConfig:
    """``config`` with ``changes`` (values may be strings, as from ``--set``).

    Args:
        config: The configuration to change.
        changes: Key -> value. ``variant`` takes a whole rule variant (see :func:`_variant_value`);
            ``variant.FIELD`` one field of it, applied after ``variant``.

    Returns:
        The new configuration.

    Raises:
        ConfigError: An unknown key or variant field, or a bad value; the message names it.
    """
    types = {f.name: str(f.type) for f in fields(MetaTrainConfig)}
    plain = {k: v for k, v in changes.items() if not k.startswith(VARIANT_PREFIX)}
    unknown = sorted(set(plain) - set(types))
    if unknown:
        raise ConfigError(
            f"meta-train config: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(types)} "
            f"(and {VARIANT_PREFIX}FIELD for a field of the rule variant)"
        )
    coerced = {k: _coerce(k, v, getattr(config, k), types[k]) for k, v in plain.items() if k != "variant"}
    variant = _variant_value(plain["variant"]) if "variant" in plain else config.variant
    field_changes = {k[len(VARIANT_PREFIX):]: v for k, v in changes.items() if k.startswith(VARIANT_PREFIX)}
    if field_changes:
        try:
            values = {name: parse_field(name, v) if isinstance(v, str) else v for name, v in field_changes.items()}
            variant = dataclasses.replace(variant, **values)
        except VariantError as exc:
            raise ConfigError(f"meta-train config: {exc}") from None
    coerced["variant"] = variant
    return dataclasses.replace(config, **coerced)


def parse_set(items: list[str] | None) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` with a clear error for a bad item."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = value
    return out


__all__ = [
    "AUGMENTATIONS", "ConfigError", "INNER_OPTIMIZERS", "MAX_SEED", "MetaTrainConfig", "PRESETS", "VARIANT_PREFIX",
    "override", "parse_set", "preset",
]
