"""Reader for the IDX format of MNIST and Fashion-MNIST.

IDX is a big-endian header (two zero bytes, a type code, the number of
dimensions, then one uint32 per dimension) followed by the raw array. The
published files are gzip-compressed; users often hold them decompressed, so
both are read, the compression being detected from the content, not the name.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from celo2.data.errors import DatasetFormatError, DatasetNotFoundError

#: IDX type code -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
#: Magic numbers of the two kinds of file MNIST ships.
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims (count, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim (count)
_GZIP_MAGIC = b"\x1f\x8b"


def read_bytes_maybe_gzip(path: "str | os.PathLike[str]") -> bytes:
    """The file's bytes, decompressed when it is gzip (detected by its magic bytes).

    Raises:
        DatasetNotFoundError: no file at ``path``.
        DatasetFormatError: the file cannot be read, or its gzip data are corrupt or truncated.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: no such file") from None
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot read ({exc})") from exc
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def parse_idx(data: bytes, origin: str = "<bytes>", expected_magic: int | None = None) -> np.ndarray:
    """Decode IDX bytes into a native-endian array, checking the header against the payload size."""
    if len(data) < 4:
        raise DatasetFormatError(f"{origin}: too short for an IDX header ({len(data)} bytes)")
    magic = struct.unpack(">I", data[:4])[0]
    if expected_magic is not None and magic != expected_magic:
        raise DatasetFormatError(
            f"{origin}: IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({_describe_magic(expected_magic)})"
        )
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in IDX_DTYPES or ndim == 0:
        raise DatasetFormatError(f"{origin}: not an IDX file (magic number 0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(f"{origin}: truncated IDX header ({ndim} dimensions declared)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        raise DatasetFormatError(
            f"{origin}: IDX header declares shape {tuple(dims)} ({expected} bytes of data) "
            f"but the file holds {found} bytes after the header"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: "str | os.PathLike[str]", expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array."""
    return parse_idx(read_bytes_maybe_gzip(path), origin=str(path), expected_magic=expected_magic)


def write_idx(path: "str | os.PathLike[str]", array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as IDX (gzip-compressed when ``compress`` or the name ends in ``.gz``).

    Used by the tests and handy for making small fixtures in the published format.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): c for c, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, codes[native], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(IDX_DTYPES[codes[native]], copy=False).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return path


def _describe_magic(magic: int) -> str:
    return {
        IDX_IMAGES_MAGIC: "uint8 images: count, rows, cols",
        IDX_LABELS_MAGIC: "uint8 labels: count",
    }.get(magic, "IDX")
