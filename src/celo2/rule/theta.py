"""Theta: the 347 meta-parameters of the Celo2 MLP, independent of any framework.

:class:`Theta` holds the weights of the rule's MLP and checks them on
construction: every key of :data:`celo2.rule.spec.THETA_KEYS`, each of its
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


@dataclass
class Theta:
    """The Celo2 MLP weights (``(in, out)`` layout) plus free-form metadata.

    One framework-neutral object for both front ends: :class:`celo2.torch.Celo2`
    and :func:`celo2.optax.celo2` take it as ``theta=``. Build one with
    :func:`celo2.load_theta` (files, ``hf://``, the shipped theta), :meth:`init` or
    :meth:`from_flat`; the arrays are validated (keys, shapes, finite float32)
    on construction.

    Args:
        arrays: Every key of :data:`celo2.rule.spec.THETA_KEYS` mapped to an array of
            the shape :func:`celo2.rule.spec.theta_shapes` gives; copied to float32.
        metadata: Free-form JSON-able information (source, config, checksum); default empty.

    Attributes:
        arrays: The validated float32 arrays, keyed like :data:`celo2.rule.spec.THETA_KEYS`.
        metadata: As given; loaders add ``"source"``.

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

    def __post_init__(self) -> None:
        self.arrays = validated_arrays(self.arrays, origin="theta")

    # -- construction ----------------------------------------------------------
    @classmethod
    def init(cls, seed: int = 0) -> "Theta":
        """A fresh theta as meta-training starts it.

        Truncated normals (cut at two standard deviations) with std
        ``1/sqrt(fan_in)``: ``1/sqrt(30)`` for the first layer, ``1/sqrt(8)``
        after it; zero biases.

        Args:
            seed: Seed of NumPy's generator (default 0); recorded as ``metadata["init_seed"]``.

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
        for key, shape in spec.theta_shapes().items():
            if key.startswith("b"):
                arrays[key] = np.zeros(shape, np.float32)
            elif key.startswith("w0__"):
                arrays[key] = truncnorm(shape, 1.0 / np.sqrt(spec.NUM_FEATURES))
            else:
                arrays[key] = truncnorm(shape, 1.0 / np.sqrt(spec.HIDDEN_SIZE))
        return cls(arrays, {"init_seed": seed})

    @classmethod
    def from_flat(cls, flat: np.ndarray, metadata: Mapping[str, Any] | None = None) -> "Theta":
        """Inverse of :meth:`to_flat`.

        Args:
            flat: The 347 values in :data:`celo2.rule.spec.THETA_KEYS` order (any shape).
            metadata: Metadata of the new theta (default none).

        Returns:
            The theta.

        Raises:
            ThetaError: ``flat`` does not hold 347 values, or one is not finite.
        """
        flat = np.asarray(flat, np.float32).reshape(-1)
        if flat.size != spec.NUM_THETA_PARAMS:
            raise ThetaError(
                f"a flat theta has {spec.NUM_THETA_PARAMS} values, got {flat.size}"
            )
        arrays, offset = {}, 0
        for key, shape in spec.theta_shapes().items():
            n = int(np.prod(shape))
            arrays[key] = flat[offset : offset + n].reshape(shape).copy()
            offset += n
        return cls(arrays, dict(metadata or {}))

    # -- views -------------------------------------------------------------------
    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def to_flat(self) -> np.ndarray:
        """The values as one vector.

        Returns:
            All 347 values in :data:`celo2.rule.spec.THETA_KEYS` order, float32.
        """
        return np.concatenate([self.arrays[k].reshape(-1) for k in spec.THETA_KEYS])

    def first_layer(self, vector: bool = False) -> np.ndarray:
        """The first layer as one matrix.

        Args:
            vector: Only the feature groups vectors use (default ``False``).

        Returns:
            ``(30, 8)``, or ``(15, 8)`` with ``vector``.
        """
        groups = spec.FEATURE_GROUPS[: spec.VECTOR_GROUPS] if vector else spec.FEATURE_GROUPS
        return np.concatenate([self.arrays[f"w0__{g.index}"] for g in groups], axis=0)

    @property
    def num_params(self) -> int:
        """The number of values (347)."""
        return int(sum(a.size for a in self.arrays.values()))

    def checksum(self) -> str:
        """A short fingerprint of the values (not of the metadata).

        Returns:
            The first 16 hex digits of the SHA-256 of the float32 values in key order.
        """
        return hashlib.sha256(self.to_flat().astype("<f4").tobytes()).hexdigest()[:16]

    def to_pylo_state_dict(self) -> dict[str, np.ndarray]:
        """The arrays as PyLO names and lays them out.

        Returns:
            PyLO's key -> a copy of the array, matrices transposed to ``(out, in)``.
        """
        return {
            PYLO_NAMES[k]: (v.T.copy() if v.ndim == 2 else v.copy())
            for k, v in self.arrays.items()
        }

    def __repr__(self) -> str:
        return f"Theta({self.num_params} params, sha256:{self.checksum()})"

    def allclose(self, other: "Theta", atol: float = 0.0) -> bool:
        """Whether every array of ``other`` is within ``atol`` of this theta's.

        Args:
            other: The theta to compare with.
            atol: Absolute tolerance (default 0: equal values).

        Returns:
            ``True`` when all 347 values agree.
        """
        return all(np.allclose(self[k], other[k], rtol=0, atol=atol) for k in spec.THETA_KEYS)


def validated_arrays(arrays: Mapping[str, Any], origin: str) -> dict[str, np.ndarray]:
    """Check every key, shape and value of a would-be theta before anything uses it.

    Every reader of a theta calls this, so a partial or damaged source raises
    here and never becomes a half-loaded :class:`Theta`.

    Args:
        arrays: Theta keys mapped to array-likes.
        origin: Where the arrays come from (a file name, ``"mapping"``); it starts every error message.

    Returns:
        A float32 copy of each array, keyed in :data:`celo2.rule.spec.THETA_KEYS` order.

    Raises:
        ThetaError: A key is missing or unknown, a value is not an array, has the wrong shape,
            is not of a float dtype, or holds a non-finite value.
    """
    expected = spec.theta_shapes()
    missing = [k for k in expected if k not in arrays]
    if missing:
        raise ThetaError(f"{origin}: missing theta key(s) {', '.join(missing)}")
    unknown = sorted(str(k) for k in set(arrays) - set(expected))
    if unknown:
        raise ThetaError(f"{origin}: unknown theta key(s) {', '.join(unknown)}")
    out: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        try:
            value = np.asarray(arrays[key])
        except (TypeError, ValueError) as exc:
            raise ThetaError(f"{origin}: theta key {key!r} is not an array ({exc!s:.120})") from exc
        if value.shape != shape:
            raise ThetaError(
                f"{origin}: theta key {key!r} has shape {tuple(value.shape)}, expected {shape}"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise ThetaError(f"{origin}: theta key {key!r} has dtype {value.dtype}, expected float")
        value = value.astype(np.float32)
        if not np.all(np.isfinite(value)):
            raise ThetaError(f"{origin}: theta key {key!r} holds non-finite values")
        out[key] = value
    return out
