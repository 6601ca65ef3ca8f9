"""The file formats a theta is kept in: bytes to :class:`~celo2.rule.theta.Theta` and back.

* the authors' ``theta.state`` (flax msgpack; decoded here with plain
  ``msgpack``, so flax is not needed),
* a PyLO-style PyTorch ``state_dict`` (``.pt``; read with
  ``torch.load(weights_only=True)``, never by unpickling arbitrary objects),
* the project's own ``.npz`` (keys as in :data:`celo2.rule.spec.THETA_KEYS`,
  plus a JSON metadata record and, from format ``celo2-theta-v2`` on, a SHA-256
  of the content); the published ``ff_mod_stack/...`` npz layout is read too.

Every format records the rule variant a theta belongs to
(:class:`celo2.rule.variant.RuleVariant`) when it is not the published one, as
the variant's JSON text: beside ``ff_mod_stack`` in a ``.state``
(:data:`VARIANT_KEY`), as the ``__variant__`` member of a ``.npz`` (format
``celo2-theta-v3``, whose checksum covers it), as a ``state_dict`` entry of a
``.pt`` (:data:`VARIANT_KEY`). A file without that record is the published
rule, so a published theta's file is byte for byte what it was before variants
existed. Reading builds the variant's shapes and checks every array against
them.

Every reader validates the complete set of keys, shapes and values before it
returns (:func:`celo2.rule.theta.validated_arrays`), so a truncated or
corrupted file raises :class:`~celo2.rule.theta.ThetaError` and never yields a
half-loaded theta. Every parser is bounded: files, zip members, declared array
sizes and pickles are capped in size, and no file can drive recursion deeper
than one msgpack extension record. Which corruption each format can and cannot
detect is listed in ``docs/theta-files.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from celo2.rule.theta import Theta, ThetaError, pylo_names, validated_arrays
from celo2.rule.variant import PUBLISHED, RuleVariant, VariantError

#: msgpack extension codes used by ``flax.serialization``.
_FLAX_EXT_NDARRAY = 1
_FLAX_EXT_NATIVE_COMPLEX = 2
_FLAX_EXT_NPSCALAR = 3
#: Scope names of the authors' checkpoint: ``{"ff_mod_stack": {"~": {...}}}``.
_FLAX_SCOPE = ("ff_mod_stack", "~")
#: The project's ``.npz`` format: v2 carries ``__sha256__`` (see :func:`_content_sha256`); v1 files have none;
#: v3 is v2 plus the ``__variant__`` record of a rule variant other than the published one.
_PROJECT_FORMAT = "celo2-theta-v2"
_VARIANT_FORMAT = "celo2-theta-v3"
_PROJECT_FORMATS_READ = ("celo2-theta-v1", _PROJECT_FORMAT, _VARIANT_FORMAT)
#: The key of a rule variant's JSON record in a flax ``.state`` (top level) and a PyLO ``.pt`` ``state_dict``.
VARIANT_KEY = "celo2_variant"
#: Largest theta file read. A theta is 347 floats (under 8 KiB in every format); the cap leaves room for metadata.
MAX_FILE_BYTES = 4 << 20
#: Most members of a ``.npz`` or ``.pt`` zip archive (a theta's ``.pt`` has 23 to 25, a celo2 ``.npz`` 22).
_MAX_ZIP_MEMBERS = 64
#: Largest pickle inside a ``.pt``. PyLO's is under 2 KiB; the cap bounds how deeply a pickle can nest
#: objects, since hashing a nested tuple key recurses in C (a 1 MB pickle overflows the stack).
_MAX_PICKLE_BYTES = 64 << 10
#: Most dimensions of an array in a theta file (theta arrays have one or two).
_MAX_NDIM = 8
#: dtype kinds an array in a theta file may have: float, signed and unsigned int, bool (npz text records add unicode).
_ARRAY_KINDS = "fiub"


# -- the authors' flax msgpack format ------------------------------------------------
def _array_from_parts(parts: Any, origin: str, what: str) -> np.ndarray:
    """An array from flax's ``[shape, dtype name, buffer]`` triple, every part checked before use."""
    if not (isinstance(parts, (list, tuple)) and len(parts) == 3):
        raise ThetaError(f"{origin}: {what} is not a [shape, dtype, buffer] record")
    shape, dtype_name, buffer = parts
    if not (
        isinstance(shape, (list, tuple))
        and len(shape) <= _MAX_NDIM
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_FILE_BYTES for n in shape)
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
        The msgpack bytes of ``{"ff_mod_stack": {"~": {key: array}}}`` in ``theta.variant.theta_keys``
        order, plus ``"celo2_variant": <JSON text>`` after it for a variant other than the published one.
    """
    import msgpack

    inner = {k: np.ascontiguousarray(theta.arrays[k]) for k in theta.variant.theta_keys}
    tree: dict[str, Any] = {_FLAX_SCOPE[0]: {_FLAX_SCOPE[1]: inner}}
    if not theta.variant.is_published:
        tree[VARIANT_KEY] = theta.variant.to_json()
    return msgpack.packb(tree, default=_flax_ext_default, use_bin_type=True)


def _variant_of_record(record: Any, origin: str) -> RuleVariant:
    """The rule variant of a file's variant record (JSON text), as a :class:`ThetaError` when malformed."""
    if not isinstance(record, str):
        raise ThetaError(f"{origin}: the rule variant record {VARIANT_KEY} is not a JSON text")
    try:
        return RuleVariant.from_json(record, origin=f"{origin}: rule variant record")
    except VariantError as exc:
        raise ThetaError(str(exc)) from None


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
    if len(data) > MAX_FILE_BYTES:
        raise ThetaError(f"{origin}: {len(data)} bytes, more than a theta file holds ({MAX_FILE_BYTES})")
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
    variant = _variant_of_record(tree[VARIANT_KEY], origin) if VARIANT_KEY in tree else PUBLISHED
    return Theta(validated_arrays(node, origin, variant), {"source": origin}, variant)


# -- bounded readers shared by the file formats -------------------------------------------
def read_theta_bytes(path: Path) -> bytes:
    """The bytes of a theta file (or of its JSON record), read with a bound on their size.

    Args:
        path: The file.

    Returns:
        Its bytes, at most :data:`MAX_FILE_BYTES`.

    Raises:
        ThetaError: ``path`` is not a regular file, cannot be read, is empty, or is larger
            than :data:`MAX_FILE_BYTES`.
    """
    try:
        if not path.is_file():
            raise ThetaError(f"{path}: not a regular file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ThetaError(f"{path}: {size} bytes, more than a theta file holds ({MAX_FILE_BYTES})")
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ThetaError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > MAX_FILE_BYTES:
        raise ThetaError(f"{path}: more than a theta file holds ({MAX_FILE_BYTES} bytes)")
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
            if total > 4 * MAX_FILE_BYTES:
                raise ThetaError(f"{origin}: archive members declare {total} bytes, more than a theta holds")
            members: dict[str, bytes] = {}
            for info in infos:
                name = info.filename
                if name in members:
                    raise ThetaError(f"{origin}: archive member {name!r:.80} appears twice")
                if info.file_size > MAX_FILE_BYTES:
                    raise ThetaError(f"{origin}: archive member {name!r:.80} declares {info.file_size} bytes")
                with archive.open(info) as fh:
                    body = fh.read(MAX_FILE_BYTES + 1)
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
def _content_sha256(arrays: Mapping[str, np.ndarray], metadata_json: str, variant: RuleVariant = PUBLISHED) -> str:
    """The SHA-256 (hex) that formats ``celo2-theta-v2`` and ``-v3`` store in ``__sha256__``.

    It covers the metadata JSON text, (v3) the variant's JSON text, and, for each key in
    ``variant.theta_keys`` order, the key, the shape and the float32 little-endian values.
    """
    digest = hashlib.sha256(metadata_json.encode("utf-8") + b"\0")
    if not variant.is_published:
        digest.update(variant.to_json().encode("utf-8") + b"\0")
    for key in variant.theta_keys:
        value = np.ascontiguousarray(arrays[key], dtype="<f4")
        digest.update(f"{key}{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _npz_text(raw: dict[str, np.ndarray], name: str, origin: str) -> str | None:
    """Pop the 0-d string member ``name`` (``__format__``, ``__metadata__``, ``__sha256__``, ``__variant__``),
    if present."""
    if name not in raw:
        return None
    value = raw.pop(name)
    if value.ndim != 0 or value.dtype.kind != "U":
        raise ThetaError(f"{origin}: member {name} is not a text record")
    return str(value[()])


def theta_to_npz_bytes(theta: Theta) -> bytes:
    """The project's ``.npz`` bytes, format ``celo2-theta-v2``.

    Args:
        theta: The theta to serialise.

    Returns:
        A ``.npz`` of the arrays, ``__format__``, ``__metadata__`` (JSON) and ``__sha256__``
        (of the metadata and the values, checked on reading); for a variant other than the
        published one, format ``celo2-theta-v3`` with its ``__variant__`` record (JSON, in the checksum).
    """
    metadata_json = json.dumps(theta.metadata, default=str)
    variant = theta.variant
    records = {"__format__": np.asarray(_PROJECT_FORMAT if variant.is_published else _VARIANT_FORMAT),
               "__metadata__": np.asarray(metadata_json)}
    if not variant.is_published:
        records["__variant__"] = np.asarray(variant.to_json())
    records["__sha256__"] = np.asarray(_content_sha256(theta.arrays, metadata_json, variant))
    buf = io.BytesIO()
    np.savez(buf, **records, **theta.arrays)
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
    variant_json = _npz_text(raw, "__variant__", origin)
    if fmt is not None and fmt not in _PROJECT_FORMATS_READ:
        raise ThetaError(
            f"{origin}: theta format {fmt!r:.40}; this celo2 reads {', '.join(_PROJECT_FORMATS_READ)} "
            "(a newer celo2 may read it)"
        )
    if fmt in (_PROJECT_FORMAT, _VARIANT_FORMAT) and recorded is None:
        raise ThetaError(f"{origin}: format {fmt} without its __sha256__ record (the file is damaged)")
    if (fmt == _VARIANT_FORMAT) != (variant_json is not None):
        raise ThetaError(f"{origin}: format {fmt} {'without' if variant_json is None else 'with'} a __variant__ "
                         f"record (only {_VARIANT_FORMAT} has one; the file is damaged)")
    variant = PUBLISHED if variant_json is None else _variant_of_record(variant_json, origin)
    prefix = _FLAX_SCOPE[0] + "/"
    if raw and all(k.startswith(prefix) for k in raw):
        raw = {k[len(prefix):]: v for k, v in raw.items()}
    arrays = validated_arrays(raw, origin, variant)
    if recorded is not None:
        actual = _content_sha256(arrays, metadata_json or "", variant)
        if actual != recorded:
            raise ThetaError(
                f"{origin}: checksum mismatch (the file records sha256 {recorded[:16]}..., its content hashes "
                f"to {actual[:16]}...): the file is corrupted"
            )
    metadata: dict[str, Any] = {}
    if metadata_json is not None:
        metadata = json_object(metadata_json, origin, "__metadata__ record")
    metadata.setdefault("source", origin)
    return Theta(arrays, metadata, variant)


def json_object(text: str, origin: Any, what: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object: the one reader of the JSON records next to and inside theta files.

    Args:
        text: The JSON text.
        origin: The file it came from, for the message.
        what: What the record is (``"__metadata__ record"``, ``"run metadata"``), for the message.

    Returns:
        The object.

    Raises:
        ThetaError: Malformed JSON, or JSON that is not an object; the message names ``origin`` and ``what``.
    """
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ThetaError(f"{origin}: malformed {what} ({exc!s:.200})") from exc
    if not isinstance(record, dict):
        raise ThetaError(f"{origin}: the {what} is not a JSON object")
    return record


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
    variant = _variant_of_record(state[VARIANT_KEY], origin) if VARIANT_KEY in state else PUBLISHED
    names = pylo_names(variant)
    arrays: dict[str, np.ndarray] = {}
    for key, shape in variant.theta_shapes().items():
        name = names[key]
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
    unknown = sorted(str(k) for k in set(state) - set(names.values()) - {VARIANT_KEY})
    if unknown:
        raise ThetaError(f"{origin}: unknown state_dict key(s) {', '.join(unknown)}")
    return Theta(validated_arrays(arrays, origin, variant), {"source": origin}, variant)



def theta_from_file(path: Path) -> Theta:
    """Read a theta file whose format is told by its contents (and its extension where they are ambiguous).

    Args:
        path: A flax ``.state``/``.msgpack``, a celo2 or published ``.npz``, or a PyLO ``.pt``/``.pth``.

    Returns:
        The validated theta; ``metadata["source"]`` is the path (a celo2 ``.npz`` adds its own metadata).

    Raises:
        ThetaError: The file cannot be read, is too large, of an unknown format, malformed,
            truncated or (where its format records a checksum) corrupted.
    """
    data = read_theta_bytes(path)
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



def theta_to_pylo_bytes(theta: Theta) -> bytes:
    """A PyLO-style PyTorch ``state_dict`` file's bytes (what ``torch.save`` writes).

    Args:
        theta: The theta to serialise.

    Returns:
        The zip-based ``.pt`` bytes of :meth:`Theta.to_pylo_state_dict` (plus ``"celo2_variant"``: the
        variant's JSON text, for a variant other than the published one); guarded by zip's CRC-32 only.
    """
    import torch

    state: dict[str, Any] = {k: torch.from_numpy(v) for k, v in theta.to_pylo_state_dict().items()}
    if not theta.variant.is_published:
        state[VARIANT_KEY] = theta.variant.to_json()
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


#: File extension -> the format :func:`celo2.save_theta` writes for it.
FORMAT_OF_SUFFIX: dict[str, str] = {".state": "flax", ".msgpack": "flax", ".npz": "npz", ".pt": "pylo", ".pth": "pylo"}

#: Format name (``save_theta(format=...)``) -> the function giving a theta's bytes in it.
WRITERS: dict[str, Callable[[Theta], bytes]] = {
    "flax": theta_to_flax_bytes,
    "npz": theta_to_npz_bytes,
    "pylo": theta_to_pylo_bytes,
}
