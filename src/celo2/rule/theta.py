"""Theta: the 347 meta-parameters of the Celo2 MLP, independent of any framework.

One object serves both front ends. It reads and writes the formats users hold:

* the authors' ``theta.state`` (flax msgpack; decoded here with plain
  ``msgpack``, so flax is not needed),
* a PyLO-style PyTorch ``state_dict`` (``.pt``; read with
  ``torch.load(weights_only=True)``, never by unpickling arbitrary objects),
* the project's own ``.npz`` (keys as in :data:`celo2.rule.spec.THETA_KEYS`,
  plus a JSON metadata record); the published ``ff_mod_stack/...`` npz layout
  is read too.

Every loader validates the complete set of keys, shapes and values before it
returns, so a truncated or corrupted file raises :class:`ThetaError` and never
yields a half-loaded theta.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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
_PROJECT_FORMAT = "celo2-theta-v1"
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
    """The Celo2 MLP weights (``(in, out)`` layout) plus free-form metadata."""

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
        """Inverse of :meth:`to_flat`."""
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
        """All 347 values in :data:`spec.THETA_KEYS` order, float32."""
        return np.concatenate([self.arrays[k].reshape(-1) for k in spec.THETA_KEYS])

    def first_layer(self, vector: bool = False) -> np.ndarray:
        """The first layer as one ``(30, 8)`` matrix (``(15, 8)`` with ``vector``)."""
        groups = spec.FEATURE_GROUPS[: spec.VECTOR_GROUPS] if vector else spec.FEATURE_GROUPS
        return np.concatenate([self.arrays[f"w0__{g.index}"] for g in groups], axis=0)

    @property
    def num_params(self) -> int:
        return int(sum(a.size for a in self.arrays.values()))

    def checksum(self) -> str:
        """SHA-256 (first 16 hex digits) of the float32 values in key order."""
        return hashlib.sha256(self.to_flat().astype("<f4").tobytes()).hexdigest()[:16]

    def to_pylo_state_dict(self) -> dict[str, np.ndarray]:
        """Arrays under PyLO's names and ``(out, in)`` layout."""
        return {
            _pylo_key(k): (v.T.copy() if v.ndim == 2 else v.copy())
            for k, v in self.arrays.items()
        }

    def __repr__(self) -> str:
        return f"Theta({self.num_params} params, sha256:{self.checksum()})"

    def allclose(self, other: "Theta", atol: float = 0.0) -> bool:
        return all(np.allclose(self[k], other[k], rtol=0, atol=atol) for k in spec.THETA_KEYS)


def _validated(arrays: Mapping[str, Any], origin: str) -> dict[str, np.ndarray]:
    """Check every key, shape and value; return float32 copies."""
    expected = spec.theta_shapes()
    missing = [k for k in expected if k not in arrays]
    if missing:
        raise ThetaError(f"{origin}: missing theta key(s) {', '.join(missing)}")
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise ThetaError(f"{origin}: unknown theta key(s) {', '.join(unknown)}")
    out: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        value = np.asarray(arrays[key])
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
def _flax_ext_hook(code: int, data: bytes) -> Any:
    if code == _FLAX_EXT_NDARRAY:
        shape, dtype, buffer = _unpack(data)
        return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)
    if code == _FLAX_EXT_NPSCALAR:
        shape, dtype, buffer = _unpack(data)
        return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)[()]
    if code == _FLAX_EXT_NATIVE_COMPLEX:
        re_, im = _unpack(data)
        return complex(re_, im)
    raise ThetaError(f"unknown msgpack extension type {code}")


def _unpack(data: bytes) -> Any:
    import msgpack

    return msgpack.unpackb(data, raw=False, ext_hook=_flax_ext_hook, strict_map_key=False)


def _flax_ext_default(obj: Any) -> Any:
    import msgpack

    if isinstance(obj, np.ndarray):
        payload = msgpack.packb(
            (list(obj.shape), obj.dtype.name, obj.tobytes("C")), use_bin_type=True
        )
        return msgpack.ExtType(_FLAX_EXT_NDARRAY, payload)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def theta_to_flax_bytes(theta: Theta) -> bytes:
    """The authors' ``theta.state`` bytes (what ``flax.serialization.to_bytes`` writes)."""
    import msgpack

    inner = {k: np.ascontiguousarray(theta[k]) for k in spec.THETA_KEYS}
    tree = {_FLAX_SCOPE[0]: {_FLAX_SCOPE[1]: inner}}
    return msgpack.packb(tree, default=_flax_ext_default, use_bin_type=True)


def theta_from_flax_bytes(data: bytes, origin: str = "theta.state") -> Theta:
    try:
        tree = _unpack(data)
    except ThetaError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise ThetaError(f"{origin}: not a readable flax msgpack theta ({exc})") from exc
    if not isinstance(tree, dict):
        raise ThetaError(f"{origin}: expected a mapping at the top of the msgpack file")
    node: Any = tree
    for scope in _FLAX_SCOPE:
        if not isinstance(node, dict) or scope not in node:
            raise ThetaError(f"{origin}: missing key {scope!r} of {'/'.join(_FLAX_SCOPE)}")
        node = node[scope]
    return Theta(_validated(node, origin), {"source": origin})


# -- file dispatch -------------------------------------------------------------------
def _sniff(path: Path, head: bytes) -> str:
    suffix = path.suffix.lower()
    if head.startswith(b"PK"):
        # .npz and torch's zip-based .pt are both zip archives.
        import zipfile

        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile as exc:
            raise ThetaError(f"{path}: damaged zip archive ({exc})") from exc
        if any(n.endswith("data.pkl") for n in names):
            return "pt"
        return "npz"
    if suffix in (".state", ".msgpack") or (head[:1] and 0x80 <= head[0] <= 0x8F) or head[:1] in (b"\xde", b"\xdf"):
        return "state"
    if suffix in (".pt", ".pth"):
        return "pt"
    raise ThetaError(
        f"{path}: unknown theta file format (expected a flax msgpack .state, a PyLO "
        f"PyTorch .pt state_dict, or a celo2 .npz)"
    )


def _load_npz(path: Path) -> Theta:
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {name: npz[name] for name in npz.files}
    except Exception as exc:
        raise ThetaError(f"{path}: not a readable .npz theta ({exc})") from exc
    metadata: dict[str, Any] = {}
    if "__metadata__" in raw:
        try:
            metadata = json.loads(str(raw.pop("__metadata__")))
        except json.JSONDecodeError as exc:
            raise ThetaError(f"{path}: malformed __metadata__ record ({exc})") from exc
    raw.pop("__format__", None)
    prefix = "/".join(_FLAX_SCOPE[:1]) + "/"
    if raw and all(k.startswith(prefix) for k in raw):
        raw = {k[len(prefix):]: v for k, v in raw.items()}
    metadata.setdefault("source", str(path))
    return Theta(_validated(raw, str(path)), metadata)


def _load_pt(path: Path) -> Theta:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ThetaError(f"{path}: reading a PyTorch .pt theta needs torch installed") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ThetaError(f"{path}: not a readable PyTorch state_dict ({exc})") from exc
    if not isinstance(state, Mapping):
        raise ThetaError(f"{path}: expected a state_dict mapping, got {type(state).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for key, shape in spec.theta_shapes().items():
        name = _pylo_key(key)
        if name not in state:
            raise ThetaError(f"{path}: missing state_dict key {name!r} (theta key {key!r})")
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise ThetaError(f"{path}: state_dict key {name!r} is not a tensor")
        value = value.detach().cpu().float().numpy()
        expected = shape[::-1] if len(shape) == 2 else shape
        if value.shape != expected:
            raise ThetaError(
                f"{path}: state_dict key {name!r} has shape {tuple(value.shape)}, expected {expected}"
            )
        arrays[key] = value.T if value.ndim == 2 else value
    unknown = sorted(set(state) - {_pylo_key(k) for k in spec.THETA_KEYS})
    if unknown:
        raise ThetaError(f"{path}: unknown state_dict key(s) {', '.join(unknown)}")
    return Theta(_validated(arrays, str(path)), {"source": str(path)})


def default_theta_path() -> Path:
    """Where the project's own meta-trained theta is shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / _DEFAULT_ASSET


def load_theta(source: "str | os.PathLike[str] | Theta | Mapping[str, Any] | None" = None) -> Theta:
    """Load a theta from a file, a mapping, an ``hf://owner/repo[/file]`` URL, or the default.

    With no argument this returns the project's own meta-trained theta shipped
    in the package. The format of a file is detected from its contents (and
    its extension where contents are ambiguous).
    """
    if source is None:
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
            theta.metadata.update(json.loads(meta_path.read_text()))
        theta.metadata["source"] = "celo2 (shipped)"
        return theta
    if isinstance(source, Theta):
        return source
    if isinstance(source, Mapping):
        return Theta(_validated({k: np.asarray(v) for k, v in source.items()}, "mapping"))
    text = os.fspath(source)
    if text.startswith("hf://"):
        return load_theta(_download_from_hub(text))
    path = Path(text).expanduser()
    if not path.exists():
        raise ThetaNotFoundError(f"theta file not found: {path}")
    if path.is_dir():
        candidates = [path / _HF_DEFAULT_FILENAME, path / _DEFAULT_ASSET]
        for candidate in candidates:
            if candidate.exists():
                return load_theta(candidate)
        raise ThetaNotFoundError(f"{path}: a folder without a {_HF_DEFAULT_FILENAME} file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise ThetaError(f"{path}: empty file")
    kind = _sniff(path, head)
    if kind == "npz":
        return _load_npz(path)
    if kind == "pt":
        return _load_pt(path)
    return theta_from_flax_bytes(path.read_bytes(), origin=str(path))


SHIPPED_LABEL = "shipped"
"""The theta spec that names the project's shipped theta (``load_theta()``)."""


class ThetaSpecError(ValueError):
    """A command-line theta spec that names no loadable theta; the message names the spec."""


@dataclass(frozen=True)
class LabelledTheta:
    """A theta named on a command line: its label, the theta, and where it came from."""

    label: str
    theta: Theta
    source: str


def load_labelled_thetas(entries: "list[str]", flag: str = "--theta") -> "list[LabelledTheta]":
    """Load the thetas of command-line specs: ``shipped``, ``LABEL=PATH`` or
    ``PATH`` (labelled by the file's stem). Labels must be distinct and made of
    letters, digits, ``-``, ``_`` and ``.``, since they become column names
    and file names. Shared by ``celo2 bench`` and ``celo2 meta-train score``."""
    out: list[LabelledTheta] = []
    for entry in entries:
        if entry == SHIPPED_LABEL:
            label, path = SHIPPED_LABEL, None
        elif "=" in entry:
            label, path = (x.strip() for x in entry.split("=", 1))
            if not label or not path:
                raise ThetaSpecError(f"{flag} {entry!r}: expected LABEL=PATH")
        else:
            label, path = Path(entry).stem, entry
        if not label.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ThetaSpecError(f"{flag} {entry!r}: label {label!r} must be letters, digits, '-', '_' or '.'")
        if any(t.label == label for t in out):
            raise ThetaSpecError(f"{flag}: label {label!r} given twice")
        try:
            theta = load_theta(path)
        except ThetaNotFoundError as exc:
            if path is None:
                raise ThetaSpecError(
                    f"{flag} shipped: the project has no shipped theta yet "
                    f"({exc}); pass {flag} LABEL=PATH (e.g. {flag} published=theta.state)"
                ) from None
            raise ThetaSpecError(f"{flag} {entry!r}: {exc}") from None
        except (ThetaError, OSError) as exc:
            raise ThetaSpecError(f"{flag} {entry!r}: cannot load {path}: {exc}") from None
        source = "celo2.load_theta() (shipped)" if path is None else str(Path(path).resolve())
        out.append(LabelledTheta(label, theta, source))
    return out


def _download_from_hub(url: str) -> str:
    """Fetch ``hf://owner/repo[/path/in/repo][@revision]`` with huggingface_hub."""
    rest = url[len("hf://"):]
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2:
        raise ThetaError(f"{url}: expected hf://owner/repo[/file][@revision]")
    repo_id = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or _HF_DEFAULT_FILENAME
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ThetaError(
            f"{url}: downloading from the Hugging Face Hub needs 'pip install huggingface_hub'"
        ) from exc
    return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)


def save_theta(theta: "Theta | Mapping[str, Any]", path: "str | os.PathLike[str]", format: str | None = None) -> Path:
    """Write ``theta`` atomically; the format follows ``format`` or the extension.

    ``.state`` (or ``format="flax"``): the authors' msgpack format;
    ``.npz`` (``"npz"``): the project's own, with metadata;
    ``.pt`` (``"pylo"``): a PyLO-style PyTorch ``state_dict``.
    """
    theta = load_theta(theta) if not isinstance(theta, Theta) else theta
    path = Path(path).expanduser()
    kind = format or {".state": "flax", ".msgpack": "flax", ".npz": "npz", ".pt": "pylo", ".pth": "pylo"}.get(
        path.suffix.lower()
    )
    if kind == "flax":
        data = theta_to_flax_bytes(theta)
    elif kind == "npz":
        buf = io.BytesIO()
        np.savez(
            buf,
            __format__=np.asarray(_PROJECT_FORMAT),
            __metadata__=np.asarray(json.dumps(theta.metadata, default=str)),
            **theta.arrays,
        )
        data = buf.getvalue()
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
