"""Theta: the meta-parameters of the Celo2 MLP (347 for the published rule), independent of any framework.

:class:`Theta` holds the weights of the rule's MLP and the rule variant they
belong to (:class:`celo2.rule.variant.RuleVariant`, default the published
rule), and checks them on construction: every key the variant implies
(:data:`celo2.rule.spec.THETA_KEYS` for the published rule), each of its
shape, float values, all finite, stored as float32. The files a theta is kept
in (the authors' flax ``.state``, PyLO's ``.pt``, the project's ``.npz``), the
theta shipped with the package and ``hf://`` downloads are the business of
:mod:`celo2.theta_files`, which builds on this module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from celo2.rule import spec
from celo2.rule.variant import PUBLISHED, RuleVariant


class ThetaError(ValueError):
    """A theta file or mapping is malformed: wrong key, shape, value or format."""


def _pylo_name(key: str) -> str:
    if key.startswith("w0__"):
        return f"first_layer_weights.{key[4:]}"
    return {
        "b0": "first_layer_bias",
        "w1": "hidden.weight",
        "b1": "hidden.bias",
        "w2": "output.weight",
        "b2": "output.bias",
    }[key]


#: PyLO's ``state_dict`` name of each theta key. PyLO stores weight matrices ``(out, in)``, theta ``(in, out)``.
PYLO_NAMES: dict[str, str] = {key: _pylo_name(key) for key in spec.THETA_KEYS}


def pylo_names(variant: RuleVariant = PUBLISHED) -> dict[str, str]:
    """The PyLO-style ``state_dict`` name of each theta key of ``variant``.

    The published keys keep PyLO's names (:data:`PYLO_NAMES`). A variant of
    other depth names its hidden-to-hidden layers ``hidden.<k>.weight`` /
    ``hidden.<k>.bias`` (``k`` from 0) and its last layer ``output.*``.

    Args:
        variant: The rule variant (default the published rule).

    Returns:
        Theta key -> ``state_dict`` name, in :meth:`RuleVariant.theta_shapes` order.
    """
    if variant.hidden_layers == spec.HIDDEN_LAYERS:
        return {key: _pylo_name(key) for key in variant.theta_keys}
    last = variant.hidden_layers
    names = {}
    for key in variant.theta_keys:
        if key.startswith("w0__") or key == "b0":
            names[key] = _pylo_name(key)
        else:
            k = int(key[1:])
            part = "weight" if key[0] == "w" else "bias"
            names[key] = f"output.{part}" if k == last else f"hidden.{k - 1}.{part}"
    return names


@dataclass
class Theta:
    """The Celo2 MLP weights (``(in, out)`` layout), the rule variant they belong to, and free-form metadata.

    One framework-neutral object for both front ends: :class:`celo2.torch.Celo2`
    and :func:`celo2.optax.celo2` take it as ``theta=`` (any rule variant: the published one runs on every
    backend, other variants on the reference, chunked and XLA paths). Build one with
    :func:`celo2.load_theta` (files, ``hf://``, the shipped theta), :meth:`init` or
    :meth:`from_flat`; the arrays are validated (keys, shapes, finite float32)
    against the variant on construction.

    Args:
        arrays: Every key of ``variant.theta_shapes()`` (:data:`celo2.rule.spec.THETA_KEYS` for
            the published rule) mapped to an array of that shape; copied to float32.
        metadata: Free-form JSON-able information (source, config, checksum); default empty.
        variant: The rule variant (default :data:`celo2.rule.variant.PUBLISHED`).

    Attributes:
        arrays: The validated float32 arrays, keyed in ``variant.theta_keys`` order.
        metadata: As given; loaders add ``"source"``.
        variant: As given.

    Raises:
        ThetaError: A key is missing or unknown, a shape is wrong, or a value is not finite.

    Example:
        >>> from celo2 import Theta
        >>> theta = Theta.init(seed=0)
        >>> theta.num_params
        347
        >>> Theta.from_flat(theta.to_flat()).allclose(theta)
        True
    """

    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    variant: RuleVariant = PUBLISHED

    def __post_init__(self) -> None:
        if not isinstance(self.variant, RuleVariant):
            raise ThetaError(f"theta: variant must be a RuleVariant, got {type(self.variant).__name__}")
        self.arrays = validated_arrays(self.arrays, origin="theta", variant=self.variant)

    # -- construction ----------------------------------------------------------
    @classmethod
    def init(cls, seed: int = 0, variant: RuleVariant = PUBLISHED) -> "Theta":
        """A fresh theta as meta-training starts it.

        Truncated normals (cut at two standard deviations) with std
        ``1/sqrt(fan_in)``: ``1/sqrt(features)`` for the first layer (30 features
        published), ``1/sqrt(hidden width)`` after it; zero biases.

        Args:
            seed: Seed of NumPy's generator (default 0); recorded as ``metadata["init_seed"]``.
            variant: The rule variant whose shapes to draw (default the published rule).

        Returns:
            The new theta.
        """
        rng = np.random.default_rng(seed)

        def truncnorm(shape: tuple[int, ...], std: float) -> np.ndarray:
            out = rng.standard_normal(shape)
            bad = np.abs(out) > 2.0
            while bad.any():
                out[bad] = rng.standard_normal(int(bad.sum()))
                bad = np.abs(out) > 2.0
            return (out * std).astype(np.float32)

        arrays: dict[str, np.ndarray] = {}
        for key, shape in variant.theta_shapes().items():
            if key.startswith("b"):
                arrays[key] = np.zeros(shape, np.float32)
            elif key.startswith("w0__"):
                arrays[key] = truncnorm(shape, 1.0 / np.sqrt(variant.num_features))
            else:
                arrays[key] = truncnorm(shape, 1.0 / np.sqrt(variant.hidden_width))
        return cls(arrays, {"init_seed": seed}, variant)

    @classmethod
    def from_flat(cls, flat: np.ndarray, metadata: Mapping[str, Any] | None = None,
                  variant: RuleVariant = PUBLISHED) -> "Theta":
        """Inverse of :meth:`to_flat`.

        Args:
            flat: The values in ``variant.theta_keys`` order (any shape).
            metadata: Metadata of the new theta (default none).
            variant: The rule variant (default the published rule: 347 values).

        Returns:
            The theta.

        Raises:
            ThetaError: ``flat`` does not hold ``variant.num_theta_params`` values, or one is not finite.
        """
        flat = np.asarray(flat, np.float32).reshape(-1)
        if flat.size != variant.num_theta_params:
            where = "" if variant.is_published else f" for rule variant {variant.label}"
            raise ThetaError(f"a flat theta has {variant.num_theta_params} values{where}, got {flat.size}")
        arrays, offset = {}, 0
        for key, shape in variant.theta_shapes().items():
            n = int(np.prod(shape))
            arrays[key] = flat[offset : offset + n].reshape(shape).copy()
            offset += n
        return cls(arrays, dict(metadata or {}), variant)

    # -- views -------------------------------------------------------------------
    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.arrays[key]
        except KeyError:
            if self.variant.is_published:
                raise
            raise KeyError(f"theta of rule variant {self.variant.label} has no array {key!r} (its keys: "
                           f"{', '.join(self.arrays)})") from None

    def to_flat(self) -> np.ndarray:
        """The values as one vector.

        Returns:
            All values in ``variant.theta_keys`` order (:data:`celo2.rule.spec.THETA_KEYS` published), float32.
        """
        return np.concatenate([self.arrays[k].reshape(-1) for k in self.variant.theta_keys])

    def first_layer(self, vector: bool = False) -> np.ndarray:
        """The first layer as one matrix.

        Args:
            vector: Only the feature groups vectors use (default ``False``).

        Returns:
            ``(features, hidden width)``: ``(30, 8)`` published, or ``(15, 8)`` with ``vector``.
        """
        groups = self.variant.vector_groups if vector else self.variant.groups
        return np.concatenate([self.arrays[f"w0__{g.index}"] for g in groups], axis=0)

    @property
    def num_params(self) -> int:
        """The number of values (347 for the published rule)."""
        return int(sum(a.size for a in self.arrays.values()))

    def checksum(self) -> str:
        """A short fingerprint of the values and the variant (not of the metadata).

        Returns:
            The first 16 hex digits of the SHA-256 of the float32 values in key order; for a
            variant other than the published one, of its JSON record (:meth:`RuleVariant.to_json`)
            and a NUL byte before them, so that equal values of different rules differ.
        """
        prefix = b"" if self.variant.is_published else self.variant.to_json().encode() + b"\0"
        return hashlib.sha256(prefix + self.to_flat().astype("<f4").tobytes()).hexdigest()[:16]

    def to_pylo_state_dict(self) -> dict[str, np.ndarray]:
        """The arrays as PyLO names and lays them out.

        Returns:
            PyLO's key (:func:`pylo_names`) -> a copy of the array, matrices transposed to ``(out, in)``.
        """
        names = pylo_names(self.variant)
        return {
            names[k]: (v.T.copy() if v.ndim == 2 else v.copy())
            for k, v in self.arrays.items()
        }

    def __repr__(self) -> str:
        where = "" if self.variant.is_published else f", variant {self.variant.label}"
        return f"Theta({self.num_params} params{where}, sha256:{self.checksum()})"

    def allclose(self, other: "Theta", atol: float = 0.0) -> bool:
        """Whether ``other`` is of the same variant and each of its arrays within ``atol`` of this theta's.

        Args:
            other: The theta to compare with.
            atol: Absolute tolerance (default 0: equal values).

        Returns:
            ``True`` when the variants are equal and every value agrees.
        """
        return self.variant == other.variant and all(
            np.allclose(self[k], other[k], rtol=0, atol=atol) for k in self.variant.theta_keys)


def validated_arrays(arrays: Mapping[str, Any], origin: str, variant: RuleVariant = PUBLISHED) -> dict[str, np.ndarray]:
    """Check every key, shape and value of a would-be theta before anything uses it.

    Every reader of a theta calls this, so a partial or damaged source raises
    here and never becomes a half-loaded :class:`Theta`.

    Args:
        arrays: Theta keys mapped to array-likes.
        origin: Where the arrays come from (a file name, ``"mapping"``); it starts every error message.
        variant: The rule variant the arrays belong to (default the published rule); a
            message about another variant names it.

    Returns:
        A float32 copy of each array, keyed in ``variant.theta_keys`` order.

    Raises:
        ThetaError: A key is missing or unknown, a value is not an array, has the wrong shape,
            is not of a float dtype, or holds a non-finite value.
    """
    expected = variant.theta_shapes()
    of = "" if variant.is_published else f" (rule variant {variant.label})"
    missing = [k for k in expected if k not in arrays]
    if missing:
        raise ThetaError(f"{origin}: missing theta key(s) {', '.join(missing)}{of}")
    unknown = sorted(str(k) for k in set(arrays) - set(expected))
    if unknown:
        raise ThetaError(f"{origin}: unknown theta key(s) {', '.join(unknown)}{of}")
    out: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        try:
            value = np.asarray(arrays[key])
        except (TypeError, ValueError) as exc:
            raise ThetaError(f"{origin}: theta key {key!r} is not an array ({exc!s:.120})") from exc
        if value.shape != shape:
            raise ThetaError(
                f"{origin}: theta key {key!r} has shape {tuple(value.shape)}, expected {shape}{of}"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise ThetaError(f"{origin}: theta key {key!r} has dtype {value.dtype}, expected float")
        value = value.astype(np.float32)
        if not np.all(np.isfinite(value)):
            raise ThetaError(f"{origin}: theta key {key!r} holds non-finite values")
        out[key] = value
    return out
