"""Theta: the 347 meta-parameters of the Celo2 MLP, independent of any framework.

One object serves both front ends. It reads and writes the formats users hold:

* the authors' ``theta.state`` (flax msgpack; decoded here with plain
  ``msgpack``, so flax is not needed),
* a PyLO-style PyTorch ``state_dict`` (``.pt``; read with
  ``torch.load(weights_only=True)``, never by unpickling arbitrary objects),
* the project's own ``.npz`` (keys as in :data:`celo2.rule.spec.THETA_KEYS`,
  plus a JSON metadata record and, from format ``celo2-theta-v2`` on, a SHA-256
  of the content); the published ``ff_mod_stack/...`` npz layout is read too.

Every loader validates the complete set of keys, shapes and values before it
returns, so a truncated or corrupted file raises :class:`ThetaError` and never
yields a half-loaded theta. Every parser is bounded: files, zip members,
declared array sizes and pickles are capped in size, and no file can drive
recursion deeper than one msgpack extension record. Which corruption each
format can and cannot detect is listed in ``docs/theta-files.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from celo2._io import atomic_write_bytes
from celo2.rule import spec

#: msgpack extension codes used by ``flax.serialization``.
_FLAX_EXT_NDARRAY = 1
_FLAX_EXT_NATIVE_COMPLEX = 2
_FLAX_EXT_NPSCALAR = 3
#: Scope names of the authors' checkpoint: ``{"ff_mod_stack": {"~": {...}}}``.
_FLAX_SCOPE = ("ff_mod_stack", "~")
#: The project's ``.npz`` format: v2 carries ``__sha256__`` (see :func:`_content_sha256`); v1 files have none.
_PROJECT_FORMAT = "celo2-theta-v2"
_PROJECT_FORMATS_READ = ("celo2-theta-v1", _PROJECT_FORMAT)
#: Largest theta file read. A theta is 347 floats (under 8 KiB in every format); the cap leaves room for metadata.
_MAX_FILE_BYTES = 4 << 20
#: Most members of a ``.npz`` or ``.pt`` zip archive (a theta's ``.pt`` has 23 to 25, a celo2 ``.npz`` 22).
_MAX_ZIP_MEMBERS = 64
#: Largest pickle inside a ``.pt``. PyLO's is under 2 KiB; the cap bounds how deeply a pickle can nest
#: objects, since hashing a nested tuple key recurses in C (a 1 MB pickle overflows the stack).
_MAX_PICKLE_BYTES = 64 << 10
#: Most dimensions of an array in a theta file (theta arrays have one or two).
_MAX_NDIM = 8
#: dtype kinds an array in a theta file may have: float, signed and unsigned int, bool (npz text records add unicode).
_ARRAY_KINDS = "fiub"
#: Seconds ``hf://`` waits for the Hub to answer before it falls back to the local cache.
_HF_TIMEOUT_S = 5.0
_DEFAULT_ASSET = "celo2_theta.state"
_HF_DEFAULT_FILENAME = "theta.state"


class ThetaError(ValueError):
    """A theta file or mapping is malformed: wrong key, shape, value or format."""


class ThetaNotFoundError(FileNotFoundError):
    """No theta where one was asked for."""


def _pylo_key(key: str) -> str:
    """PyLO ``state_dict`` name of a theta array (PyLO stores weights ``(out, in)``)."""
    if key.startswith("w0__"):
        return f"first_layer_weights.{key[4:]}"
    return {
        "b0": "first_layer_bias",
        "w1": "hidden.weight",
        "b1": "hidden.bias",
        "w2": "output.weight",
        "b2": "output.bias",
    }[key]


@dataclass
class Theta:
    """The Celo2 MLP weights (``(in, out)`` layout) plus free-form metadata.

    One framework-neutral object for both front ends: :class:`celo2.torch.Celo2`
    and :func:`celo2.optax.celo2` take it as ``theta=``. Build one with
    :func:`load_theta` (files, ``hf://``, the shipped theta), :meth:`init` or
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
        self.arrays = _validated(self.arrays, origin="theta")

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
            _pylo_key(k): (v.T.copy() if v.ndim == 2 else v.copy())
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


def _validated(arrays: Mapping[str, Any], origin: str) -> dict[str, np.ndarray]:
    """Check every key, shape and value; return float32 copies."""
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


# -- the authors' flax msgpack format ------------------------------------------------
def _array_from_parts(parts: Any, origin: str, what: str) -> np.ndarray:
    """An array from flax's ``[shape, dtype name, buffer]`` triple, every part checked before use."""
    if not (isinstance(parts, (list, tuple)) and len(parts) == 3):
        raise ThetaError(f"{origin}: {what} is not a [shape, dtype, buffer] record")
    shape, dtype_name, buffer = parts
    if not (
        isinstance(shape, (list, tuple))
        and len(shape) <= _MAX_NDIM
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= _MAX_FILE_BYTES for n in shape)
    ):
        raise ThetaError(f"{origin}: {what} has a malformed shape {shape!r:.80}")
    if not isinstance(dtype_name, str) or not isinstance(buffer, bytes):
        raise ThetaError(f"{origin}: {what} has a malformed dtype or buffer")
    try:
        dtype = np.dtype(dtype_name)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ThetaError(f"{origin}: {what} has an unknown dtype {dtype_name!r:.40}") from exc
    if dtype.kind not in _ARRAY_KINDS or dtype.itemsize == 0:
        raise ThetaError(f"{origin}: {what} has dtype {dtype}, expected a numeric dtype")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != len(buffer):
        raise ThetaError(
            f"{origin}: {what} declares shape {tuple(shape)} of {dtype} ({nbytes} bytes), holds {len(buffer)}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _flax_payload(data: bytes, origin: str, code: int) -> Any:
    """Decode the payload of one flax extension record; payloads hold no further extension records."""
    import msgpack

    def no_nested_ext(inner: int, _data: bytes) -> Any:
        raise ThetaError(f"{origin}: msgpack extension record {inner} nested inside extension record {code}")

    return msgpack.unpackb(data, raw=False, ext_hook=no_nested_ext, strict_map_key=True)


def _flax_tree(data: bytes, origin: str) -> Any:
    """The msgpack tree of a flax file, with flax's numpy extension records decoded to arrays."""
    import msgpack

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == _FLAX_EXT_NDARRAY:
            return _array_from_parts(_flax_payload(payload, origin, code), origin, "an array record")
        if code == _FLAX_EXT_NPSCALAR:
            return _array_from_parts(_flax_payload(payload, origin, code), origin, "a scalar record")[()]
        if code == _FLAX_EXT_NATIVE_COMPLEX:
            raise ThetaError(f"{origin}: a complex number where theta holds real arrays")
        raise ThetaError(f"{origin}: unknown msgpack extension type {code}")

    return msgpack.unpackb(data, raw=False, ext_hook=ext_hook, strict_map_key=True)


def _flax_ext_default(obj: Any) -> Any:
    import msgpack

    if isinstance(obj, np.ndarray):
        payload = msgpack.packb(
            (list(obj.shape), obj.dtype.name, obj.tobytes("C")), use_bin_type=True
        )
        return msgpack.ExtType(_FLAX_EXT_NDARRAY, payload)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def theta_to_flax_bytes(theta: Theta) -> bytes:
    """The authors' ``theta.state`` bytes (what ``flax.serialization.to_bytes`` writes).

    Args:
        theta: The theta to serialise.

    Returns:
        The msgpack bytes of ``{"ff_mod_stack": {"~": {key: array}}}`` in :data:`spec.THETA_KEYS` order.
    """
    import msgpack

    inner = {k: np.ascontiguousarray(theta[k]) for k in spec.THETA_KEYS}
    tree = {_FLAX_SCOPE[0]: {_FLAX_SCOPE[1]: inner}}
    return msgpack.packb(tree, default=_flax_ext_default, use_bin_type=True)


def theta_from_flax_bytes(data: bytes, origin: str = "theta.state") -> Theta:
    """Decode the authors' flax msgpack ``theta.state`` bytes.

    The format has no checksum: a changed weight byte that keeps the value finite
    cannot be detected; damage to the structure (lengths, types, keys) can.

    Args:
        data: The file's bytes (at most 4 MiB).
        origin: Name of the source, used in error messages (default ``"theta.state"``).

    Returns:
        The validated theta, with ``metadata["source"] = origin``.

    Raises:
        ThetaError: The bytes are not a complete, well-formed flax theta.
    """
    if len(data) > _MAX_FILE_BYTES:
        raise ThetaError(f"{origin}: {len(data)} bytes, more than a theta file holds ({_MAX_FILE_BYTES})")
    try:
        tree = _flax_tree(data, origin)
    except ThetaError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise ThetaError(f"{origin}: not a readable flax msgpack theta ({type(exc).__name__}: {exc!s:.200})") from exc
    if not isinstance(tree, dict):
        raise ThetaError(f"{origin}: expected a mapping at the top of the msgpack file")
    node: Any = tree
    for scope in _FLAX_SCOPE:
        if not isinstance(node, dict) or scope not in node:
            raise ThetaError(f"{origin}: missing key {scope!r} of {'/'.join(_FLAX_SCOPE)}")
        node = node[scope]
    if not isinstance(node, dict):
        raise ThetaError(f"{origin}: {'/'.join(_FLAX_SCOPE)} is not a mapping of arrays")
    return Theta(_validated(node, origin), {"source": origin})


# -- bounded readers shared by the file formats -------------------------------------------
def _read_theta_file(path: Path) -> bytes:
    """The bytes of a regular file of at most :data:`_MAX_FILE_BYTES`; ThetaError for anything else."""
    try:
        if not path.is_file():
            raise ThetaError(f"{path}: not a regular file")
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise ThetaError(f"{path}: {size} bytes, more than a theta file holds ({_MAX_FILE_BYTES})")
        with open(path, "rb") as fh:
            data = fh.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ThetaError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > _MAX_FILE_BYTES:
        raise ThetaError(f"{path}: more than a theta file holds ({_MAX_FILE_BYTES} bytes)")
    if not data:
        raise ThetaError(f"{path}: empty file")
    return data


def _zip_members(data: bytes, origin: str) -> dict[str, bytes]:
    """Every member of a zip archive, read in full so that zip's CRC-32 of each is checked.

    Member count, declared sizes and their total are capped before anything is decompressed.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            if len(infos) > _MAX_ZIP_MEMBERS:
                raise ThetaError(f"{origin}: {len(infos)} archive members, a theta has at most {_MAX_ZIP_MEMBERS}")
            total = sum(info.file_size for info in infos)
            if total > 4 * _MAX_FILE_BYTES:
                raise ThetaError(f"{origin}: archive members declare {total} bytes, more than a theta holds")
            members: dict[str, bytes] = {}
            for info in infos:
                name = info.filename
                if name in members:
                    raise ThetaError(f"{origin}: archive member {name!r:.80} appears twice")
                if info.file_size > _MAX_FILE_BYTES:
                    raise ThetaError(f"{origin}: archive member {name!r:.80} declares {info.file_size} bytes")
                with archive.open(info) as fh:
                    body = fh.read(_MAX_FILE_BYTES + 1)
                if len(body) != info.file_size:
                    raise ThetaError(
                        f"{origin}: archive member {name!r:.80} holds {len(body)} bytes, declares {info.file_size}"
                    )
                members[name] = body
    except ThetaError:
        raise
    except Exception as exc:  # zipfile, zlib and struct raise several unrelated types
        raise ThetaError(f"{origin}: damaged zip archive ({type(exc).__name__}: {exc!s:.200})") from exc
    return members


def _npy_array(raw: bytes, what: str) -> np.ndarray:
    """One ``.npy`` record; the declared dtype and shape are checked against the bytes before any allocation."""
    fp = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ThetaError(f"{what}: .npy format version {version} (expected 1.0 or 2.0)")
    except ThetaError:
        raise
    except Exception as exc:  # numpy reports bad headers with ValueError, SyntaxError, EOFError, ...
        raise ThetaError(f"{what}: malformed .npy header ({type(exc).__name__}: {exc!s:.200})") from exc
    if dtype.hasobject or dtype.kind not in _ARRAY_KINDS + "U" or dtype.itemsize == 0 or len(shape) > _MAX_NDIM:
        raise ThetaError(f"{what}: array of dtype {dtype} and {len(shape)} dimensions, expected a numeric array")
    count = math.prod(shape)
    offset = fp.tell()
    if count * dtype.itemsize != len(raw) - offset:
        raise ThetaError(
            f"{what}: declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes), holds {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")


# -- the project's .npz ----------------------------------------------------------------
def _content_sha256(arrays: Mapping[str, np.ndarray], metadata_json: str) -> str:
    """The SHA-256 (hex) that format ``celo2-theta-v2`` stores in ``__sha256__``.

    It covers the metadata JSON text and, for each key in :data:`spec.THETA_KEYS` order,
    the key, the shape and the float32 little-endian values.
    """
    digest = hashlib.sha256(metadata_json.encode("utf-8") + b"\0")
    for key in spec.THETA_KEYS:
        value = np.ascontiguousarray(arrays[key], dtype="<f4")
        digest.update(f"{key}{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _npz_text(raw: dict[str, np.ndarray], name: str, origin: str) -> str | None:
    """Pop the 0-d string member ``name`` (``__format__``, ``__metadata__``, ``__sha256__``) if present."""
    if name not in raw:
        return None
    value = raw.pop(name)
    if value.ndim != 0 or value.dtype.kind != "U":
        raise ThetaError(f"{origin}: member {name} is not a text record")
    return str(value[()])


def _npz_to_bytes(theta: Theta) -> bytes:
    """Format ``celo2-theta-v2``: the arrays, ``__format__``, ``__metadata__`` (JSON) and ``__sha256__``."""
    metadata_json = json.dumps(theta.metadata, default=str)
    buf = io.BytesIO()
    np.savez(
        buf,
        __format__=np.asarray(_PROJECT_FORMAT),
        __metadata__=np.asarray(metadata_json),
        __sha256__=np.asarray(_content_sha256(theta.arrays, metadata_json)),
        **theta.arrays,
    )
    return buf.getvalue()


def _load_npz(members: dict[str, bytes], origin: str) -> Theta:
    raw: dict[str, np.ndarray] = {}
    for name, body in members.items():
        if not name.endswith(".npy"):
            raise ThetaError(f"{origin}: archive member {name!r:.80} is not a .npy array")
        raw[name[: -len(".npy")]] = _npy_array(body, f"{origin}: member {name!r:.80}")
    fmt = _npz_text(raw, "__format__", origin)
    metadata_json = _npz_text(raw, "__metadata__", origin)
    recorded = _npz_text(raw, "__sha256__", origin)
    if fmt is not None and fmt not in _PROJECT_FORMATS_READ:
        raise ThetaError(
            f"{origin}: theta format {fmt!r:.40}; this celo2 reads {', '.join(_PROJECT_FORMATS_READ)} "
            "(a newer celo2 may read it)"
        )
    if fmt == _PROJECT_FORMAT and recorded is None:
        raise ThetaError(f"{origin}: format {fmt} without its __sha256__ record (the file is damaged)")
    prefix = _FLAX_SCOPE[0] + "/"
    if raw and all(k.startswith(prefix) for k in raw):
        raw = {k[len(prefix):]: v for k, v in raw.items()}
    arrays = _validated(raw, origin)
    if recorded is not None:
        actual = _content_sha256(arrays, metadata_json or "")
        if actual != recorded:
            raise ThetaError(
                f"{origin}: checksum mismatch (the file records sha256 {recorded[:16]}..., its content hashes "
                f"to {actual[:16]}...): the file is corrupted"
            )
    metadata: dict[str, Any] = {}
    if metadata_json is not None:
        try:
            metadata = json.loads(metadata_json)
        except (ValueError, RecursionError) as exc:
            raise ThetaError(f"{origin}: malformed __metadata__ record ({exc!s:.200})") from exc
        if not isinstance(metadata, dict):
            raise ThetaError(f"{origin}: the __metadata__ record is not a JSON object")
    metadata.setdefault("source", origin)
    return Theta(arrays, metadata)


# -- PyLO's PyTorch state_dict ------------------------------------------------------------
def _load_pt(members: dict[str, bytes], origin: str) -> Theta:
    pickles = [name for name in members if name.endswith("data.pkl")]
    if len(pickles) != 1:
        raise ThetaError(f"{origin}: a PyTorch archive holds one data.pkl, this one {len(pickles)}")
    if len(members[pickles[0]]) > _MAX_PICKLE_BYTES:
        raise ThetaError(f"{origin}: {pickles[0]} is {len(members[pickles[0]])} bytes, more than a state_dict needs")
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ThetaError(f"{origin}: reading a PyTorch .pt theta needs torch installed") from exc
    # torch reads a fresh archive of the members zipfile has checked: its own zip reader trusts header fields
    # that zipfile ignores (a changed external-attributes field makes it load wrong values without an error).
    clean = io.BytesIO()
    with zipfile.ZipFile(clean, "w", zipfile.ZIP_STORED) as archive:
        for name, body in members.items():
            archive.writestr(name, body)
    try:
        state = torch.load(io.BytesIO(clean.getvalue()), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ThetaError(f"{origin}: not a readable PyTorch state_dict ({type(exc).__name__}: {exc!s:.200})") from exc
    if not isinstance(state, Mapping):
        raise ThetaError(f"{origin}: expected a state_dict mapping, got {type(state).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for key, shape in spec.theta_shapes().items():
        name = _pylo_key(key)
        if name not in state:
            raise ThetaError(f"{origin}: missing state_dict key {name!r} (theta key {key!r})")
        value = state[name]
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise ThetaError(f"{origin}: state_dict key {name!r} is not a dense tensor")
        # Shape and dtype first: a tensor of zero strides may declare far more values than its storage holds.
        expected = shape[::-1] if len(shape) == 2 else shape
        if tuple(value.shape) != expected:
            raise ThetaError(
                f"{origin}: state_dict key {name!r} has shape {tuple(value.shape)}, expected {expected}"
            )
        if not value.is_floating_point():
            raise ThetaError(f"{origin}: state_dict key {name!r} has dtype {value.dtype}, expected float")
        value = value.detach().cpu().float().numpy()
        arrays[key] = value.T if value.ndim == 2 else value
    unknown = sorted(str(k) for k in set(state) - {_pylo_key(k) for k in spec.THETA_KEYS})
    if unknown:
        raise ThetaError(f"{origin}: unknown state_dict key(s) {', '.join(unknown)}")
    return Theta(_validated(arrays, origin), {"source": origin})


def _load_file(path: Path) -> Theta:
    """Read a theta file whose format is told by its contents (and its extension where they are ambiguous)."""
    data = _read_theta_file(path)
    origin = str(path)
    suffix = path.suffix.lower()
    if data.startswith(b"PK"):
        # .npz and torch's zip-based .pt are both zip archives.
        members = _zip_members(data, origin)
        if any(name.endswith("data.pkl") for name in members):
            return _load_pt(members, origin)
        return _load_npz(members, origin)
    if suffix in (".state", ".msgpack") or 0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF):
        return theta_from_flax_bytes(data, origin=origin)
    if suffix in (".pt", ".pth"):
        raise ThetaError(
            f"{path}: not a zip-based PyTorch file; celo2 reads the format torch.save writes since "
            "torch 1.6 (re-save the state_dict with a current torch)"
        )
    if suffix == ".npz":
        raise ThetaError(f"{path}: not a zip archive, so not a readable .npz theta")
    raise ThetaError(
        f"{path}: unknown theta file format (expected a flax msgpack .state, a PyLO "
        f"PyTorch .pt state_dict, or a celo2 .npz)"
    )


def default_theta_path() -> Path:
    """Where the project's own meta-trained theta is shipped inside the package.

    Returns:
        The path of ``celo2/assets/celo2_theta.state`` (it may be absent from a stripped install).
    """
    return Path(__file__).resolve().parent.parent / "assets" / _DEFAULT_ASSET


def _load_shipped() -> Theta:
    """The shipped theta, checked against the ``theta_sha256`` that its JSON record holds."""
    path = default_theta_path()
    if not path.exists():
        raise ThetaNotFoundError(
            "this installation of celo2 ships no default theta. Pass a theta file: "
            "load_theta('path/to/theta.state') (the authors' checkpoint, e.g. "
            "'hf://amoudgl/celo2'), or meta-train one with 'celo2 meta-train'."
        )
    theta = load_theta(path)
    meta_path = path.with_suffix(".json")
    if meta_path.exists():
        try:
            record = json.loads(_read_theta_file(meta_path).decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise ThetaError(f"{meta_path}: malformed JSON record of the shipped theta ({exc!s:.200})") from exc
        if not isinstance(record, dict):
            raise ThetaError(f"{meta_path}: the record of the shipped theta is not a JSON object")
        recorded = record.get("theta_sha256")
        if recorded is not None and recorded != theta.checksum():
            raise ThetaError(
                f"{path}: the shipped theta hashes to {theta.checksum()}, its record {meta_path.name} says "
                f"{recorded}: the installed file is corrupted (reinstall celo2)"
            )
        theta.metadata.update(record)
    theta.metadata["source"] = "celo2 (shipped)"
    return theta


def load_theta(source: "str | os.PathLike[str] | Theta | Mapping[str, Any] | None" = None) -> Theta:
    """Load a theta from a file, a mapping, an ``hf://owner/repo[/file][@revision]`` URL, or the default.

    With no argument this returns the project's own meta-trained theta shipped in
    the package, checked against the checksum its JSON record holds. The format of
    a file is detected from its contents (and its extension where contents are
    ambiguous). Every parser is bounded (file and member sizes, declared array
    sizes, nesting), and anything malformed raises :class:`ThetaError`.

    What each format can detect: the project's ``.npz`` (format ``celo2-theta-v2``)
    carries a SHA-256 of its content, so any changed weight or metadata byte
    raises; older ``celo2-theta-v1`` and plain ``.npz`` files, and PyLO ``.pt``
    files, are protected by zip's per-member CRC-32 only, which catches accidental
    damage but not an edit written back with a fresh CRC. The authors' flax
    ``.state`` has no checksum: a flipped weight byte that keeps the value finite
    loads as a different theta; damage to its structure raises. Details:
    ``docs/theta-files.md``.

    Args:
        source: A path to a ``.state``, ``.npz`` or ``.pt`` file, or to a folder holding
            ``theta.state``; an ``hf://owner/repo[/path/in/repo][@revision]`` URL (file
            ``theta.state`` by default); a :class:`Theta` (returned as is); a mapping of
            theta keys to arrays; or ``None`` (default) for the shipped theta.

    Returns:
        The validated theta; ``metadata["source"]`` says where it came from.

    Raises:
        ThetaNotFoundError: The file, the folder's theta or the shipped theta does not exist.
        ThetaError: The source is malformed, truncated, corrupted, too large, of an unknown
            format, or (``hf://``) cannot be fetched; the message names the file and the problem.
    
    Example:
        >>> import celo2
        >>> theta = celo2.load_theta()            # the shipped theta
        >>> theta.metadata["source"]
        'celo2 (shipped)'
        >>> celo2.load_theta("no/such/theta.state")
        Traceback (most recent call last):
        ...
        celo2.rule.theta.ThetaNotFoundError: theta file not found: no/such/theta.state
    """
    if source is None:
        return _load_shipped()
    if isinstance(source, Theta):
        return source
    if isinstance(source, Mapping):
        return Theta(_validated(dict(source), "mapping"))
    text = os.fspath(source)
    if text.startswith("hf://"):
        return load_theta(_download_from_hub(text))
    path = Path(text).expanduser()
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # e.g. a name too long, or a NUL byte in it
        raise ThetaError(f"{text!r:.200}: not a usable theta path ({exc})") from exc
    if not exists:
        raise ThetaNotFoundError(f"theta file not found: {path}")
    if is_dir:
        for candidate in (path / _HF_DEFAULT_FILENAME, path / _DEFAULT_ASSET):
            if candidate.exists():
                return load_theta(candidate)
        raise ThetaNotFoundError(f"{path}: a folder without a {_HF_DEFAULT_FILENAME} file")
    return _load_file(path)


#: One part (owner or name) of a Hub repository id: letters, digits, '-', '_', '.'; no '-' or '.' at
#: either end; at most 96 characters in all.
_HUB_ID_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")


def _parse_hub_url(url: str) -> tuple[str, str, str | None]:
    """``hf://owner/repo[/path/in/repo][@revision]`` -> ``(repo_id, filename, revision)``, checked offline.

    Raises:
        ThetaError: the URL is malformed, the repository id is not a valid Hub id, or the
            revision after ``@`` is empty; the message names the part that is wrong.
    """
    usage = "expected hf://owner/repo[/file][@revision]"
    rest = url[len("hf://"):]
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        if not revision.strip():
            raise ThetaError(f"{url}: the revision after '@' is empty; {usage} (a branch, tag or commit), "
                             "or leave out '@' for the default branch")
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2:
        raise ThetaError(f"{url}: {usage}")
    repo_id = "/".join(parts[:2])
    bad = next((p for p in parts[:2] if not _HUB_ID_PART.match(p) or "--" in p or ".." in p), None)
    if bad is not None or len(repo_id) > 96 or repo_id.endswith(".git"):
        why = f"{bad!r} is not a valid owner or repository name" if bad is not None else "too long or ends in .git"
        raise ThetaError(
            f"{url}: {repo_id!r} is not a valid Hugging Face repository id ({why}: letters, digits, '-', '_' and "
            "'.', not starting or ending with '-' or '.', no '--' or '..', at most 96 characters); "
            f"{usage}")
    filename = "/".join(parts[2:]) or _HF_DEFAULT_FILENAME
    return repo_id, filename, revision


def _download_from_hub(url: str) -> str:
    """Fetch ``hf://owner/repo[/path/in/repo][@revision]`` with huggingface_hub; the local path of the file.

    One metadata request with a timeout of :data:`_HF_TIMEOUT_S` seconds and no retries
    tells whether the Hub answers; when it does not (or ``HF_HUB_OFFLINE`` is set) only
    the local Hugging Face cache is read, so an offline machine fails at once instead
    of in huggingface_hub's retry loop.

    Raises:
        ThetaError: Malformed URL, huggingface_hub missing, the Hub answers with an error
            (no such repository, file or revision), or no network and the file is not cached.
            The message says how to get the file.
    """
    repo_id, filename, revision = _parse_hub_url(url)
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as exc:
        raise ThetaError(
            f"{url}: downloading from the Hugging Face Hub needs 'pip install huggingface_hub'"
        ) from exc
    how = (
        f"download {filename} from https://huggingface.co/{repo_id} on a machine with network access and pass "
        "its local path, or point HF_HOME at a Hugging Face cache that holds it"
    )
    request = {"repo_id": repo_id, "filename": filename, "revision": revision}
    offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
    if offline:
        try:
            return huggingface_hub.hf_hub_download(**request, local_files_only=True)
        except Exception as exc:
            raise ThetaError(
                f"{url}: HF_HUB_OFFLINE is set and {filename} of {repo_id} is not in the local cache; {how}"
            ) from exc
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(**request), timeout=_HF_TIMEOUT_S)
    except HfHubHTTPError as exc:
        answer = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ThetaError(f"{url}: the Hub at {constants.ENDPOINT} answered: {answer:.300}") from exc
    except Exception as exc:  # no answer: connection refused, DNS failure, timeout
        try:
            return huggingface_hub.hf_hub_download(**request, local_files_only=True)
        except Exception:
            raise ThetaError(
                f"{url}: cannot reach {constants.ENDPOINT} ({type(exc).__name__}, timeout {_HF_TIMEOUT_S:g} s) "
                f"and {filename} of {repo_id} is not in the local cache; {how}"
            ) from exc
    try:
        return huggingface_hub.hf_hub_download(**request, etag_timeout=_HF_TIMEOUT_S)
    except Exception as exc:
        raise ThetaError(f"{url}: download failed ({type(exc).__name__}: {exc!s:.200}); {how}") from exc


def save_theta(theta: "Theta | Mapping[str, Any]", path: "str | os.PathLike[str]", format: str | None = None) -> Path:
    """Write ``theta`` atomically (a reader sees the old file or the whole new one).

    Formats: ``.state``/``.msgpack`` (or ``format="flax"``): the authors' flax msgpack,
    byte for byte what ``flax.serialization.to_bytes`` writes, with no checksum;
    ``.npz`` (``"npz"``): the project's own, format ``celo2-theta-v2`` with the metadata
    and a SHA-256 of the content that :func:`load_theta` verifies; ``.pt``/``.pth``
    (``"pylo"``): a PyLO-style PyTorch ``state_dict``, guarded by zip's CRC-32 only.
    What each can detect when damaged is in ``docs/theta-files.md``.

    Args:
        theta: A :class:`Theta`, or a mapping of theta keys to arrays.
        path: The file to write; its folder is created if missing.
        format: ``"flax"``, ``"npz"`` or ``"pylo"``; ``None`` (default) follows the extension of ``path``.

    Returns:
        The path written.

    Raises:
        ThetaError: ``theta`` is malformed, ``path`` is an existing folder or lies under a
            file, or the format cannot be told from ``format`` or the extension.
        OSError: The file cannot be written (e.g. a parent is a file, or no permission).

    Example:
        >>> import tempfile, celo2
        >>> folder = tempfile.mkdtemp()
        >>> path = celo2.save_theta(celo2.Theta.init(seed=1), f"{folder}/mine.npz")
        >>> celo2.load_theta(path).allclose(celo2.Theta.init(seed=1))
        True
    """
    theta = load_theta(theta) if not isinstance(theta, Theta) else theta
    path = Path(path).expanduser()
    if path.is_dir():
        raise ThetaError(f"{path}: is a folder; give the file to write, e.g. {path / 'theta.state'}")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ThetaError(f"{path}: cannot be written, {blocking} is a file, not a folder")
    kind = format or {".state": "flax", ".msgpack": "flax", ".npz": "npz", ".pt": "pylo", ".pth": "pylo"}.get(
        path.suffix.lower()
    )
    if kind == "flax":
        data = theta_to_flax_bytes(theta)
    elif kind == "npz":
        data = _npz_to_bytes(theta)
    elif kind == "pylo":
        import torch

        buf = io.BytesIO()
        torch.save({k: torch.from_numpy(v) for k, v in theta.to_pylo_state_dict().items()}, buf)
        data = buf.getvalue()
    else:
        raise ThetaError(
            f"{path}: cannot tell the theta format from the extension {path.suffix!r}; "
            "use .state (authors' flax msgpack), .npz (celo2) or .pt (PyLO), or pass format="
        )
    atomic_write_bytes(path, data)
    return path
