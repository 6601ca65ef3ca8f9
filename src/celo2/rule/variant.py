"""Rule variants as data: the architecture and accumulators of a Celo2-style rule.

:class:`RuleVariant` names everything about the learned rule that the paper's
ablations change, so that meta-training, scoring and the theta files can work
with rules other than the published one:

* ``hidden_width`` and ``hidden_layers``: the MLP is
  ``features -> width (-> width) ... -> 3`` with ReLU after every hidden layer;
  ``hidden_layers`` counts the hidden layers (the published MLP
  ``30 -> 8 -> 8 -> 3`` has two);
* ``rms_decay``, ``momentum_decays``, ``factored_decays``: the accumulators'
  decays (three momenta and three factored statistics, as the feature groups
  read three of each);
* ``feature_groups``: which of the spec's 14 feature groups feed the MLP
  (names of :data:`celo2.rule.spec.FEATURE_GROUPS`; kept in spec order); tensors
  of fewer than two dimensions use those among the first nine;
* ``output_norm``: ``"rms"`` normalises the (orthogonalised) direction to unit
  RMS over the last two axes every step, as published; ``"none"`` leaves it as
  the MLP (and Newton-Schulz) make it;
* ``outputs``: ``"direction"`` (published) uses output 0 of the MLP only;
  ``"direction+magnitude"`` also uses output 1 as a per-element log-magnitude:
  the update is ``direction * exp(MAGNITUDE_EXP_MULT * magnitude)``, applied
  after the output normalisation (which would otherwise remove any scale the
  rule chose). This is how the rule's predecessors (VeLO's per-parameter MLP,
  Celo) turn their outputs 0 and 1 into a step; the published Celo2 sets the
  magnitude's multiplier to zero, which is why its output 1 (and output 2, a
  leftover of that code) is unused.

The MLP always has :data:`celo2.rule.spec.NUM_OUTPUTS` outputs, so every
variant's theta keeps the published file layout: ``w0__<group index>`` (one per
group used, ``(width of group, hidden_width)``), ``b0``, ``w1`` ... ``w<L-1>``
(``(hidden_width, hidden_width)``), ``b1`` ... , and the output layer
``w<L>`` ``(hidden_width, 3)``, ``b<L>`` ``(3,)`` for ``L = hidden_layers``.

:data:`PUBLISHED` is the default and equals the constants of
:mod:`celo2.rule.spec`. A variant serialises to a stable JSON text
(:meth:`RuleVariant.to_json`: sorted keys, no spaces) that theta files record.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import dataclass, fields
from typing import Any, Mapping

from celo2.rule import spec

OUTPUT_NORMS: tuple[str, ...] = ("rms", "none")
"""Values of :attr:`RuleVariant.output_norm`: per-step RMS normalisation (published) or none."""
OUTPUTS: tuple[str, ...] = ("direction", "direction+magnitude")
"""Values of :attr:`RuleVariant.outputs`: the direction only (published), or a direction and a magnitude."""
MAGNITUDE_EXP_MULT: float = 1e-3
"""``direction+magnitude``: the update is ``direction * exp(MAGNITUDE_EXP_MULT * output_1)``
(the multiplier of the rule's predecessors, which keeps a freshly initialised rule's
magnitude near 1)."""
MAGNITUDE_OUTPUT: int = 1
"""The MLP output read as the log-magnitude by ``direction+magnitude`` variants."""
ALL_GROUPS: tuple[str, ...] = tuple(g.name for g in spec.FEATURE_GROUPS)
"""Every feature group's name, in spec order (what the published rule reads)."""
_GROUP_BY_NAME = {g.name: g for g in spec.FEATURE_GROUPS}
_VECTOR_GROUP_NAMES = frozenset(g.name for g in spec.FEATURE_GROUPS[: spec.VECTOR_GROUPS])


class VariantError(ValueError):
    """A rule variant with a bad field value, or a malformed variant record; the message names the field."""


class VariantNotSupportedError(VariantError):
    """A rule variant other than the published one given to code that runs the published rule only."""


class VariantPathWarning(UserWarning):
    """A rule variant's theta runs on a general path (XLA, chunked PyTorch) where the published rule would
    run on the fast kernels; emitted once per optimizer, filter it with ``warnings.filterwarnings``."""


VARIANT_PATHS: str = ("rule variants run on celo2.torch's 'torch' (chunked) and 'reference' backends and on "
                      "celo2.optax's XLA formulation (cpu_kernels=False), which meta-training and scoring use")
"""Where rule variants other than the published one run (for messages)."""


@dataclass(frozen=True)
class RuleVariant:
    """One rule architecture: MLP size, accumulator decays, feature groups, output handling.

    Args:
        hidden_width: Units per hidden layer (published 8).
        hidden_layers: Hidden layers of the MLP (published 2).
        rms_decay: Decay of the per-element second moment ``v`` (published 0.95).
        momentum_decays: The three momenta's decays (published 0.9, 0.99, 0.999).
        factored_decays: The three factored statistics' decays (published 0.9, 0.99, 0.999).
        feature_groups: Names of the feature groups used (published: all 14); stored in spec order.
        output_norm: ``"rms"`` (published) or ``"none"``.
        outputs: ``"direction"`` (published) or ``"direction+magnitude"``.

    Raises:
        VariantError: A field has a bad value; the message names the field.

    Example:
        >>> from celo2.rule.variant import PUBLISHED, RuleVariant
        >>> small = RuleVariant(hidden_width=4)
        >>> small.differences()
        ['hidden_width=4 (published 8)']
        >>> RuleVariant.from_json(small.to_json()) == small
        True
        >>> PUBLISHED.num_theta_params
        347
    """

    hidden_width: int = spec.HIDDEN_SIZE
    hidden_layers: int = spec.HIDDEN_LAYERS
    rms_decay: float = spec.RMS_DECAY
    momentum_decays: tuple[float, ...] = spec.MOMENTUM_DECAYS
    factored_decays: tuple[float, ...] = spec.FACTORED_DECAYS
    feature_groups: tuple[str, ...] = ALL_GROUPS
    output_norm: str = OUTPUT_NORMS[0]
    outputs: str = OUTPUTS[0]

    def __post_init__(self) -> None:
        for name in ("momentum_decays", "factored_decays", "feature_groups"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        self._validate()
        order = {n: i for i, n in enumerate(ALL_GROUPS)}
        object.__setattr__(self, "feature_groups", tuple(sorted(self.feature_groups, key=order.__getitem__)))
        object.__setattr__(self, "hidden_width", int(self.hidden_width))
        object.__setattr__(self, "hidden_layers", int(self.hidden_layers))
        object.__setattr__(self, "rms_decay", float(self.rms_decay))
        object.__setattr__(self, "momentum_decays", tuple(float(b) for b in self.momentum_decays))
        object.__setattr__(self, "factored_decays", tuple(float(b) for b in self.factored_decays))

    def _validate(self) -> None:
        def bad(name: str, why: str) -> VariantError:
            return VariantError(f"rule variant: {name}={getattr(self, name)!r}: {why}")

        for name in ("hidden_width", "hidden_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise bad(name, "must be a positive integer")
        if not _is_decay(self.rms_decay):
            raise bad("rms_decay", "must be a number in [0, 1)")
        for name, count in (("momentum_decays", len(spec.MOMENTUM_DECAYS)),
                            ("factored_decays", len(spec.FACTORED_DECAYS))):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != count:
                raise bad(name, f"must be {count} decays (the feature groups read {count} of each)")
            if not all(_is_decay(b) for b in value):
                raise bad(name, "every decay must be a number in [0, 1)")
        groups = self.feature_groups
        if not isinstance(groups, tuple) or not groups or not all(isinstance(g, str) for g in groups):
            raise bad("feature_groups", "must be a non-empty list of feature group names")
        unknown = [g for g in groups if g not in _GROUP_BY_NAME]
        if unknown:
            raise bad("feature_groups", f"unknown group {unknown[0]!r}; the groups are {', '.join(ALL_GROUPS)}")
        if len(set(groups)) != len(groups):
            raise bad("feature_groups", "a group is listed twice")
        if not _VECTOR_GROUP_NAMES.intersection(groups):
            raise bad("feature_groups", "use at least one of the first nine groups "
                      f"({', '.join(ALL_GROUPS[: spec.VECTOR_GROUPS])}): vectors read only those")
        if self.output_norm not in OUTPUT_NORMS:
            raise bad("output_norm", f"choose one of {', '.join(OUTPUT_NORMS)}")
        if self.outputs not in OUTPUTS:
            raise bad("outputs", f"choose one of {', '.join(OUTPUTS)}")

    # -- what the variant implies --------------------------------------------------
    @property
    def is_published(self) -> bool:
        """Whether this is the published rule (:data:`PUBLISHED`)."""
        return self == PUBLISHED

    @property
    def groups(self) -> tuple[spec.FeatureGroup, ...]:
        """The feature groups used by tensors of two or more dimensions, in spec order."""
        return tuple(_GROUP_BY_NAME[n] for n in self.feature_groups)

    @property
    def vector_groups(self) -> tuple[spec.FeatureGroup, ...]:
        """The feature groups used by 0-D and 1-D tensors (those among the first nine)."""
        return tuple(g for g in self.groups if g.name in _VECTOR_GROUP_NAMES)

    @property
    def num_features(self) -> int:
        """Input channels of a matrix (published 30)."""
        return sum(g.width for g in self.groups)

    @property
    def output_key(self) -> str:
        """The key of the output layer's weights (``"w2"`` for two hidden layers)."""
        return f"w{self.hidden_layers}"

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of every array of a theta of this variant, layout ``(in, out)``, in file order.

        Returns:
            ``w0__<index>`` per group used, ``b0``, then ``w<k>``/``b<k>`` for every later layer.
        """
        h = self.hidden_width
        shapes: dict[str, tuple[int, ...]] = {f"w0__{g.index}": (g.width, h) for g in self.groups}
        shapes["b0"] = (h,)
        for k in range(1, self.hidden_layers):
            shapes[f"w{k}"] = (h, h)
            shapes[f"b{k}"] = (h,)
        shapes[self.output_key] = (h, spec.NUM_OUTPUTS)
        shapes[f"b{self.hidden_layers}"] = (spec.NUM_OUTPUTS,)
        return shapes

    @property
    def theta_keys(self) -> tuple[str, ...]:
        """The keys of :meth:`theta_shapes`, in order."""
        return tuple(self.theta_shapes())

    @property
    def num_theta_params(self) -> int:
        """The number of values of a theta of this variant (published 347)."""
        return sum(math.prod(s) for s in self.theta_shapes().values())

    def differences(self, other: "RuleVariant | None" = None) -> list[str]:
        """The fields where this variant differs from ``other``, as ``field=value (published value)``.

        Args:
            other: The variant to compare with (default :data:`PUBLISHED`).

        Returns:
            One text per differing field, in field order; empty when equal.
        """
        base = PUBLISHED if other is None else other
        word = "published" if other is None else "other"
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(base, f.name)
            if mine != theirs:
                out.append(f"{f.name}={_text(mine)} ({word} {_text(theirs)})")
        return out

    @property
    def label(self) -> str:
        """A short name: ``"published"``, or the differing fields joined by ``", "`` without the published values."""
        if self.is_published:
            return "published"
        return ", ".join(f"{f.name}={_text(getattr(self, f.name))}" for f in fields(self)
                         if getattr(self, f.name) != getattr(PUBLISHED, f.name))

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-able values (tuples as lists)."""
        return {f.name: (list(v) if isinstance(v, tuple) else v) for f in fields(self)
                for v in (getattr(self, f.name),)}

    def to_json(self) -> str:
        """The stable JSON text of :meth:`to_dict` (sorted keys, no spaces): what theta files record."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "rule variant") -> "RuleVariant":
        """Inverse of :meth:`to_dict`; fields left out take the published values.

        Args:
            data: Field name -> value.
            origin: Where ``data`` comes from (a file name); it starts the error message.

        Returns:
            The variant.

        Raises:
            VariantError: ``data`` is not a mapping, names an unknown field, or a value is bad.
        """
        if not isinstance(data, Mapping):
            raise VariantError(f"{origin}: a rule variant is a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise VariantError(f"{origin}: unknown rule variant field(s) {', '.join(unknown)}; "
                               f"the fields are {', '.join(sorted(known))}")
        try:
            return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})
        except VariantError as exc:
            raise VariantError(f"{origin}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, origin: str = "rule variant") -> "RuleVariant":
        """Inverse of :meth:`to_json`.

        Args:
            text: The JSON text.
            origin: Where it comes from; it starts the error message.

        Returns:
            The variant.

        Raises:
            VariantError: Malformed JSON, or what :meth:`from_dict` raises.
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise VariantError(f"{origin}: malformed rule variant record ({exc!s:.200})") from None
        return cls.from_dict(data, origin)


def _is_decay(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, numbers.Real)
            and math.isfinite(value) and 0 <= value < 1)


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


PUBLISHED: RuleVariant = RuleVariant()
"""The published rule: every constant of :mod:`celo2.rule.spec`."""


def require_published(variant: RuleVariant, where: str) -> None:
    """Refuse a variant other than the published one, naming how it differs and where variants run.

    Args:
        variant: The variant of the theta at hand.
        where: What refuses it (``"the fused kernels' weight packing"``), for the message.

    Raises:
        VariantNotSupportedError: ``variant`` is not :data:`PUBLISHED`.
    """
    if variant.is_published:
        return
    raise VariantNotSupportedError(
        f"{where} runs the published rule only; this theta belongs to the rule variant "
        f"{'; '.join(variant.differences())}. {VARIANT_PATHS[0].upper()}{VARIANT_PATHS[1:]}")


def note_general_path(variant: RuleVariant, where: str, path: str) -> None:
    """Say in one line (a :class:`VariantPathWarning`) that ``variant`` runs on ``path``, not the fast kernels.

    Args:
        variant: The variant of the theta at hand; nothing is said for :data:`PUBLISHED`.
        where: Who picks the path (``"celo2.torch.Celo2"``).
        path: The path it runs on (``"the chunked PyTorch backend"``).
    """
    if variant.is_published:
        return
    warnings.warn(f"{where}: the theta of rule variant {variant.label} runs on {path}; the fast kernels run the "
                  "published rule only", VariantPathWarning, stacklevel=3)


def parse_field(name: str, text: str) -> Any:
    """A variant field's value from command-line text (``--set variant.NAME=TEXT``).

    Args:
        name: The field.
        text: Its value as typed: an integer, a number, comma-separated numbers
            (decays) or names (``feature_groups``, ``"all"`` for every group), or a word.

    Returns:
        The value in the field's type (checked further when the variant is built).

    Raises:
        VariantError: Unknown field, or text that does not read as the field's type.
    """
    kinds = {f.name: str(f.type) for f in fields(RuleVariant)}
    if name not in kinds:
        raise VariantError(f"rule variant: unknown field {name!r}; the fields are {', '.join(kinds)}")
    raw = text.strip()
    kind = kinds[name]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple[float"):
            return tuple(float(p) for p in raw.split(",") if p.strip())
        if kind.startswith("tuple[str"):
            if raw.lower() == "all":
                return ALL_GROUPS
            return tuple(p.strip() for p in raw.split(",") if p.strip())
    except ValueError as exc:
        raise VariantError(f"rule variant: {name}={text!r}: not a valid {kind} ({exc})") from None
    return raw


__all__ = [
    "ALL_GROUPS", "MAGNITUDE_EXP_MULT", "MAGNITUDE_OUTPUT", "OUTPUTS", "OUTPUT_NORMS", "PUBLISHED",
    "RuleVariant", "VARIANT_PATHS", "VariantError", "VariantNotSupportedError", "VariantPathWarning",
    "note_general_path", "parse_field", "require_published",
]
