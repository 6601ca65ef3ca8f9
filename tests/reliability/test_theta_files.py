"""Theta files never crash the loader and never load silently corrupted.

A fuzz of every loader (byte flips, truncation, insertion, nesting bombs, huge declared sizes, wrong types,
across the flax ``.state``, the project's ``.npz`` (formats v2 and v1) and PyLO ``.pt``), run in a child
interpreter so that a segfault fails the test with its signal and the case that caused it; and one test for
each crash class of issue 19. This file is also the child's script (``python test_theta_files.py MANIFEST``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

#: Mutated files per base file and format; with the structured cases, about 3,100 files without the
#: shared reference folder and about 5,300 with it.
MUTATIONS_PER_BASE = 750
SEED = 19


# -- building damaged files --------------------------------------------------------------------------------
def _msgpack():
    import msgpack

    return msgpack


def _ext_array(array: np.ndarray) -> object:
    """flax's msgpack extension record of an array (code 1: ``[shape, dtype name, buffer]``)."""
    msgpack = _msgpack()
    return msgpack.ExtType(1, msgpack.packb([list(array.shape), array.dtype.name, array.tobytes()], use_bin_type=True))


def _flax_file(inner: dict) -> bytes:
    return _msgpack().packb({"ff_mod_stack": {"~": inner}}, use_bin_type=True)


def nested_ext_bomb(depth: int) -> bytes:
    """A flax file whose ``w1`` is ``depth`` extension records each wrapping the next (about 4 bytes a level)."""
    msgpack = _msgpack()
    payload = msgpack.packb([[8, 8], "float32", bytes(256)], use_bin_type=True)
    for _ in range(depth):
        payload = msgpack.packb(msgpack.ExtType(1, payload), use_bin_type=True)
    return _flax_file({"w1": msgpack.ExtType(1, payload)})


def _flax_structured(theta) -> list[tuple[str, bytes]]:
    """Nesting bombs, huge declared sizes and wrong types in the flax format."""
    msgpack = _msgpack()
    good = {k: _ext_array(v) for k, v in theta.arrays.items()}
    cases = [(f"ext-bomb-{d}", nested_ext_bomb(d)) for d in (2, 50, 300, 1000, 5000, 50000)]
    for depth in (100, 1000, 5000):
        cases.append((f"list-bomb-{depth}", b"\x91" * depth + b"\x00"))
        cases.append((f"map-bomb-{depth}", b"\x81\xa1k" * depth + b"\x00"))
        deep_w1 = _flax_file({**good, "w1": 0}).replace(b"\xa2w1\x00", b"\xa2w1" + b"\x91" * depth + b"\x00")
        cases.append((f"w1-list-bomb-{depth}", deep_w1))

    def with_w1(value: object) -> bytes:
        return _flax_file({**good, "w1": value})

    def w1_record(shape: object, dtype: object, buffer: object) -> object:
        return msgpack.ExtType(1, msgpack.packb([shape, dtype, buffer], use_bin_type=True))

    w1 = theta["w1"].tobytes()
    cases += [
        ("huge-shape", with_w1(w1_record([10**9, 10**9], "float32", w1))),
        ("huge-shape-2", with_w1(w1_record([2**62, 4], "float32", w1))),
        ("negative-shape", with_w1(w1_record([-8, -8], "float32", w1))),
        ("many-dims", with_w1(w1_record([1] * 40, "float32", w1[:4]))),
        ("shape-not-list", with_w1(w1_record("8x8", "float32", w1))),
        ("bool-shape", with_w1(w1_record([True, 8], "float32", w1[:32]))),
        ("dtype-object", with_w1(w1_record([8, 8], "O", w1))),
        ("dtype-unicode", with_w1(w1_record([8, 8], "<U1", w1))),
        ("dtype-void", with_w1(w1_record([8, 8], "V4", w1))),
        ("dtype-nonsense", with_w1(w1_record([8, 8], "float33", w1))),
        ("dtype-int", with_w1(w1_record([8, 8], "int32", w1))),
        ("dtype-float64-short", with_w1(w1_record([8, 8], "float64", w1))),
        ("buffer-not-bytes", with_w1(w1_record([8, 8], "float32", "text"))),
        ("record-of-two", with_w1(msgpack.ExtType(1, msgpack.packb([[8, 8], "float32"])))),
        ("record-not-list", with_w1(msgpack.ExtType(1, msgpack.packb(7)))),
        ("scalar-ext", with_w1(msgpack.ExtType(3, msgpack.packb([[], "float32", b"\0\0\0\0"], use_bin_type=True)))),
        ("complex-ext", with_w1(msgpack.ExtType(2, msgpack.packb([1.0, 2.0])))),
        ("unknown-ext", with_w1(msgpack.ExtType(77, b"xyz"))),
        ("w1-string", with_w1("weights")),
        ("w1-int", with_w1(3)),
        ("w1-dict", with_w1({"a": 1})),
        ("w1-ragged-lists", with_w1([[0.5] * 8, [0.5] * 3])),
        ("w1-nan", with_w1(_ext_array(np.full((8, 8), np.nan, np.float32)))),
        ("top-list", msgpack.packb([1, 2, 3])),
        ("top-int", msgpack.packb(5)),
        ("scope-not-map", msgpack.packb({"ff_mod_stack": {"~": [1, 2]}})),
        ("int-keys", msgpack.packb({1: {2: 3}})),
        ("bin-keys", msgpack.packb({b"ff_mod_stack": {b"~": {}}}, use_bin_type=True)),
        ("declared-bin-4g", b"\x81\xa1k\xc6\xff\xff\xff\xff" + bytes(64)),
        ("declared-array-4g", b"\xdd\xff\xff\xff\xff" + bytes(64)),
        ("declared-map-4g", b"\xdf\xff\xff\xff\xff" + bytes(64)),
        ("declared-ext-4g", _flax_file({**good, "w1": 0}).replace(b"\xa2w1\x00", b"\xa2w1\xc9\xff\xff\xff\xff\x01")),
        ("missing-w1", _flax_file({k: v for k, v in good.items() if k != "w1"})),
        ("extra-key", _flax_file({**good, "w9": _ext_array(np.zeros(3, np.float32))})),
        ("trailing-data", _flax_file(good) + b"\x00"),
    ]
    return cases


def _npz_bytes(members: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **members)
    return buf.getvalue()


def _zip_bytes(members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as archive:
        for name, body in members.items():
            archive.writestr(name, body, compress_type=compress)
    return buf.getvalue()


def _npy_bytes(header: str, body: bytes) -> bytes:
    """A .npy 1.0 record with a hand-written header (padded to 64 bytes as numpy writes it)."""
    text = header.encode("latin1")
    pad = (-(10 + len(text) + 1)) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + body


def _header(descr: str, shape: str, fortran: bool = False) -> str:
    return f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"


def _npy_text(text: str) -> bytes:
    return _npy_bytes(_header(f"<U{len(text)}", "()"), text.encode("utf-32-le"))


def _npz_structured(theta, base: bytes) -> list[tuple[str, bytes]]:
    """Huge declared sizes, bombs and wrong types in the npz format."""
    members = {name: body for name, body in _members(base).items()}
    w1 = theta["w1"].tobytes()

    def with_member(name: str, body: bytes) -> bytes:
        return _zip_bytes({**members, name: body})

    deep_json = "[" * 100_000 + "]" * 100_000
    cases = [
        ("npy-huge-shape", with_member("w1.npy", _npy_bytes(_header("<f4", "(10**12,)"), w1))),
        ("npy-huge-shape-int", with_member("w1.npy", _npy_bytes(_header("<f4", "(1000000000000, 1000000000000)"), w1))),
        ("npy-zero-itemsize", with_member("w1.npy", _npy_bytes(_header("|V0", "(10**15,)"), b""))),
        ("npy-object", with_member("w1.npy", _npy_bytes(_header("|O", "(8, 8)"), w1))),
        ("npy-nested-header", with_member("w1.npy", _npy_bytes("(" * 3000 + ")" * 3000, b""))),
        ("npy-bad-version", with_member("w1.npy", b"\x93NUMPY\x07\x00" + bytes(120))),
        ("npy-int", with_member("w1.npy", _npy_bytes(_header("<i4", "(8, 8)"), w1))),
        ("npy-fortran-short", with_member("w1.npy", _npy_bytes(_header("<f4", "(8, 8)", True), w1[:-4]))),
        ("npy-nan", with_member("w1.npy", _npy_bytes(_header("<f4", "(8, 8)"), np.full(64, np.nan, "<f4").tobytes()))),
        ("not-npy-member", with_member("readme.txt", b"hello")),
        ("pickled-member", _npz_bytes({**theta.arrays, "extra": np.array([{"a": 1}], dtype=object)})),
        ("deep-json-metadata", with_member("__metadata__.npy", _npy_text(deep_json))),
        ("metadata-not-text", with_member("__metadata__.npy", _npy_bytes(_header("<f4", "(1,)"), b"\0\0\0\0"))),
        ("format-future", with_member("__format__.npy", _npy_text("celo2-theta-v9"))),
        ("zip-bomb", _zip_bytes({**members, "w1.npy": b"\0" * (64 << 20)}, zipfile.ZIP_DEFLATED)),
        ("zip-many-members", _zip_bytes({**members, **{f"x{i}.npy": b"" for i in range(5000)}})),
        ("zip-empty", _zip_bytes({})),
        ("not-a-zip-npz", b"PK\x05\x06" + bytes(18)),
    ]
    return cases


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _pt_structured(theta, base: bytes) -> list[tuple[str, bytes]]:
    """Pickle bombs, huge declared sizes and wrong types in the PyTorch zip format."""
    import torch

    members = _members(base)
    pkl = next(name for name in members if name.endswith("data.pkl"))

    def with_pickle(body: bytes) -> bytes:
        return _zip_bytes({**members, pkl: body})

    def saved(obj: object) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    state = {k: torch.from_numpy(v.copy()) for k, v in theta.to_pylo_state_dict().items()}
    original_pickle = members[pkl]
    # Storage records declare their byte count in the pickle as a small int right after the location string.
    huge_numel = original_pickle.replace(b"X\x03\x00\x00\x00cpuq", b"X\x03\x00\x00\x00cpuJ\xff\xff\xff\x7fq", 1)
    cases = [
        (f"tuple-key-bomb-{depth}", with_pickle(b"\x80\x02}K\x01" + b"\x85" * depth + b"K\x02s."))
        for depth in (1000, 60_000, 1_000_000)
    ]
    cases += [
        ("list-bomb", with_pickle(b"\x80\x02" + b"]" * 50_000 + b"a" * 49_999 + b".")),
        ("huge-storage-numel", with_pickle(huge_numel)),
        ("zero-stride-huge-tensor", saved({**state, "hidden.weight": torch.zeros(1).as_strided((10**6,) * 2, (0, 0))})),
        ("global-not-allowed", with_pickle(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02.")),
        ("top-list", saved([1, 2, 3])),
        ("int-tensor", saved({**state, "hidden.weight": torch.zeros(8, 8, dtype=torch.int32)})),
        ("complex-tensor", saved({**state, "hidden.weight": torch.zeros(8, 8, dtype=torch.complex64)})),
        ("sparse-tensor", saved({**state, "hidden.weight": torch.zeros(8, 8).to_sparse()})),
        ("not-a-tensor", saved({**state, "hidden.weight": [0.0] * 64})),
        ("extra-key", saved({**state, "extra": torch.zeros(2)})),
        ("tensor-keys", saved({torch.zeros(1).sum().item(): 1})),
        ("two-pickles", _zip_bytes({**members, "other/data.pkl": original_pickle})),
        ("legacy-format", pickle.dumps({"a": 1})),
        ("nan-tensor", saved({**state, "output.bias": torch.full((3,), float("nan"))})),
    ]
    return cases


def _mutations(data: bytes, rng: np.random.Generator, count: int) -> list[tuple[str, bytes, list[int]]]:
    """Random damage: (kind, bytes, changed positions for same-length changes, else [])."""
    out = []
    kinds = ("flip", "bit", "overwrite4", "truncate", "insert", "delete", "duplicate", "zero-run")
    for i in range(count):
        kind = kinds[i % len(kinds)]
        buf = bytearray(data)
        pos = int(rng.integers(0, len(buf)))
        changed: list[int] = []
        if kind == "flip":
            buf[pos] ^= int(rng.integers(1, 256))
            changed = [pos]
        elif kind == "bit":
            buf[pos] ^= 1 << int(rng.integers(0, 8))
            changed = [pos]
        elif kind == "overwrite4":
            end = min(len(buf), pos + 4)
            buf[pos:end] = rng.integers(0, 256, end - pos, dtype=np.uint8).tobytes()
            changed = list(range(pos, end))
        elif kind == "truncate":
            buf = buf[:pos]
        elif kind == "insert":
            buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
        elif kind == "delete":
            del buf[pos : pos + int(rng.integers(1, 17))]
        elif kind == "duplicate":
            n = int(rng.integers(1, 65))
            buf[pos:pos] = buf[pos : pos + n]
        else:
            n = int(rng.integers(1, 33))
            buf[pos : pos + n] = bytes(len(buf[pos : pos + n]))
            changed = list(range(pos, min(len(data), pos + n)))
        out.append((kind, bytes(buf), changed))
    return out


def _buffer_spans(data: bytes, theta) -> dict[str, tuple[int, int]]:
    """Where each array's float32 bytes lie in a flax file (their ``bin`` payloads)."""
    spans, start = {}, 0
    for key in theta.arrays:
        raw = theta[key].tobytes()
        at = data.index(raw, start)
        spans[key] = (at, at + len(raw))
        start = at + len(raw)
    return spans


def _flax_expectation(theta, data: bytes, mutated: bytes, changed: list[int], spans) -> str:
    """What loading a flax file may give. A change inside the weight bytes is what the format cannot detect:
    the file must load those changed weights exactly (or raise if one is no longer finite)."""
    if not changed or not all(any(a <= p < b for a, b in spans.values()) for p in changed):
        return "same-or-error"
    arrays = {k: np.frombuffer(mutated[a:b], np.float32).reshape(theta[k].shape) for k, (a, b) in spans.items()}
    if not all(np.isfinite(v).all() for v in arrays.values()):
        return "error"
    return "checksum:" + type(theta)(arrays).checksum()


def build_cases(out: Path, seeds: list[Path]) -> list[dict]:
    """Write every fuzz case under ``out``; the manifest entries say what loading each may give."""
    import celo2
    from celo2.theta_files import save_theta

    rng = np.random.default_rng(SEED)
    shipped = celo2.load_theta()
    v1 = _npz_bytes({"__format__": np.asarray("celo2-theta-v1"), "__metadata__": np.asarray("{}"), **shipped.arrays})
    bases: list[tuple[str, bytes]] = [
        ("shipped.state", save_theta(shipped, out / "base.state").read_bytes()),
        ("shipped-v2.npz", save_theta(shipped, out / "base.npz").read_bytes()),
        ("shipped-v1.npz", v1),
        ("shipped.pt", save_theta(shipped, out / "base.pt").read_bytes()),
    ] + [(f"published-{p.name}", p.read_bytes()) for p in seeds]
    cases: list[dict] = []

    def add(name: str, data: bytes, expect: str, checksum: str) -> None:
        path = out / f"{len(cases):05d}-{name}"
        path.write_bytes(data)
        cases.append({"path": str(path), "expect": expect, "checksum": checksum})

    for base_name, data in bases:
        suffix = Path(base_name).suffix
        theta = celo2.load_theta(_write(out / f"seed{suffix}", data))
        checksum = theta.checksum()
        add(f"{base_name}-intact{suffix}", data, "same", checksum)
        spans = _buffer_spans(data, theta) if suffix == ".state" else None
        for kind, mutated, changed in _mutations(data, rng, MUTATIONS_PER_BASE):
            expect = _flax_expectation(theta, data, mutated, changed, spans) if spans else "same-or-error"
            add(f"{base_name}-{kind}{suffix}", mutated, expect, checksum)
        if base_name.startswith("shipped"):
            structured = {".state": lambda: _flax_structured(theta), ".npz": lambda: _npz_structured(theta, data),
                          ".pt": lambda: _pt_structured(theta, data)}[suffix]()
            for kind, mutated in structured:
                add(f"{base_name}-{kind}{suffix}", mutated, "error", checksum)
    return cases


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- the child: load every case, record the outcome ------------------------------------------------------------
def run_cases(manifest: Path) -> None:
    """Load each case of the manifest; the case's index goes to PROGRESS before it is loaded."""
    from celo2.rule.theta import ThetaError
    from celo2.theta_files import ThetaNotFoundError, load_theta

    cases = json.loads(manifest.read_text())
    progress = manifest.with_suffix(".progress")
    results = []
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for index, case in enumerate(cases):
        os.pwrite(fd, f"{index:08d}".encode(), 0)
        try:
            outcome = "checksum:" + load_theta(case["path"]).checksum()
        except (ThetaError, ThetaNotFoundError):
            outcome = "error"
        except BaseException as exc:  # what the test exists to catch
            outcome = f"crash:{type(exc).__name__}: {exc!s:.300}"
        results.append(outcome)
    os.close(fd)
    manifest.with_suffix(".results").write_text(json.dumps(results))


def _acceptable(case: dict, outcome: str) -> bool:
    same = f"checksum:{case['checksum']}"
    return {
        "same": outcome == same,
        "same-or-error": outcome in (same, "error"),
        "error": outcome == "error",
    }.get(case["expect"], outcome in (case["expect"], "error"))


if __name__ == "__main__":
    run_cases(Path(sys.argv[1]))
    sys.exit(0)


# -- the tests ---------------------------------------------------------------------------------------------------
import pytest  # noqa: E402  (the child above needs only numpy and celo2)

import celo2  # noqa: E402
from celo2.rule.theta import ThetaError  # noqa: E402
from celo2.theta_files import load_theta, save_theta  # noqa: E402

SRC = Path(celo2.__file__).resolve().parents[1]


def _child(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _signal_name(returncode: int) -> str:
    return signal.Signals(-returncode).name if returncode < 0 else f"exit {returncode}"


def test_fuzzed_theta_files_load_intact_or_raise_theta_error(tmp_path, request):
    try:  # the published files add bases where the shared reference folder is present
        seeds = sorted(request.getfixturevalue("reference_dir").glob("celo2_official_theta*"))
    except pytest.skip.Exception:
        seeds = []
    cases = build_cases(tmp_path, seeds)
    manifest = tmp_path / "cases.json"
    manifest.write_text(json.dumps(cases))
    done = _child([__file__, str(manifest)])
    if done.returncode != 0:
        index = int(manifest.with_suffix(".progress").read_text() or 0)
        pytest.fail(
            f"the loader died ({_signal_name(done.returncode)}) on case {index} of {len(cases)}: "
            f"{cases[index]['path']}\n{done.stderr[-2000:]}"
        )
    results = json.loads(manifest.with_suffix(".results").read_text())
    bad = [f"{c['path']}: expected {c['expect']}, got {r}" for c, r in zip(cases, results) if not _acceptable(c, r)]
    assert not bad, f"{len(bad)} of {len(cases)} cases misbehaved:\n" + "\n".join(bad[:20])
    assert len(cases) >= 3000
    # The damage reached the parsers: most cases raise, and the flax weight flips load as the format allows.
    assert results.count("error") > len(cases) // 2


def test_nested_ext_bomb_is_a_theta_error_not_a_crash(tmp_path):
    bomb = tmp_path / "bomb.state"
    bomb.write_bytes(nested_ext_bomb(300))  # about 1.2 KB; segfaulted the loader before the nesting bound
    code = (
        "import sys\nfrom celo2.rule.theta import ThetaError\nfrom celo2.theta_files import load_theta\n"
        "try:\n    load_theta(sys.argv[1])\nexcept ThetaError as exc:\n    print(exc)\n"
    )
    done = _child(["-c", code, str(bomb)], timeout=120)
    assert done.returncode == 0, f"{_signal_name(done.returncode)}: {done.stderr[-2000:]}"
    assert "nested inside extension record" in done.stdout


def _rewrite_member(path: Path, member: str, change) -> None:
    """Rewrite one .npy member of an npz as a tool would: a valid zip, a fresh CRC-32."""
    members = _members(path.read_bytes())
    array = np.load(io.BytesIO(members[member]))
    buf = io.BytesIO()
    np.save(buf, change(array.copy()))
    path.write_bytes(_zip_bytes({**members, member: buf.getvalue()}))


def test_flipped_weight_byte_in_the_project_format_raises(tmp_path, random_theta):
    path = save_theta(random_theta, tmp_path / "theta.npz")
    data = bytearray(path.read_bytes())
    at = bytes(data).index(random_theta["w1"].tobytes()) + 9
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ThetaError, match="Bad CRC-32"):
        load_theta(path)


def test_weight_rewritten_with_a_fresh_crc_fails_the_checksum(tmp_path, random_theta):
    path = save_theta(random_theta, tmp_path / "theta.npz")

    def nudge(array):
        array[2, 3] = np.nextafter(array[2, 3], np.float32(np.inf))
        return array

    _rewrite_member(path, "w1.npy", nudge)
    with pytest.raises(ThetaError, match="checksum mismatch.*corrupted"):
        load_theta(path)
    _rewrite_member(path, "__metadata__.npy", lambda a: np.asarray('{"note": "edited"}'))
    with pytest.raises(ThetaError, match="checksum mismatch"):
        load_theta(path)


def test_old_format_v1_still_loads_and_cannot_detect_a_rewrite(tmp_path, random_theta):
    """What docs/theta-files.md says of format v1: read as before, blind to a rewrite with a fresh CRC-32."""
    path = tmp_path / "old.npz"
    path.write_bytes(_npz_bytes({"__format__": np.asarray("celo2-theta-v1"), "__metadata__": np.asarray('{"a": 1}'),
                                 **random_theta.arrays}))
    assert load_theta(path).allclose(random_theta) and load_theta(path).metadata["a"] == 1
    _rewrite_member(path, "w1.npy", lambda a: a * 2)
    assert not load_theta(path).allclose(random_theta)


def test_v2_round_trip_keeps_metadata_and_refuses_a_missing_checksum(tmp_path, random_theta):
    theta = celo2.Theta(random_theta.arrays, {"note": "kept", "n": 3})
    path = save_theta(theta, tmp_path / "theta.npz")
    back = load_theta(path)
    assert back.checksum() == theta.checksum() and back.metadata["note"] == "kept"
    members = _members(path.read_bytes())
    del members["__sha256__.npy"]
    path.write_bytes(_zip_bytes(members))
    with pytest.raises(ThetaError, match="without its __sha256__"):
        load_theta(path)


def test_flax_state_cannot_detect_a_weight_flip_but_catches_structure(tmp_path, random_theta):
    """The authors' format has no checksum: documented, and pinned here so the docs stay true."""
    path = save_theta(random_theta, tmp_path / "theta.state")
    data = bytearray(path.read_bytes())
    at = bytes(data).index(random_theta["w1"].tobytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    assert load_theta(path).checksum() != random_theta.checksum()
    data[at - 3] ^= 0x40  # the buffer's length prefix
    path.write_bytes(bytes(data))
    with pytest.raises(ThetaError):
        load_theta(path)


def test_oversized_files_are_refused_before_they_are_read(tmp_path):
    for suffix in (".state", ".npz", ".pt"):
        big = tmp_path / f"big{suffix}"
        with open(big, "wb") as fh:
            fh.truncate((4 << 20) + 1)
        with pytest.raises(ThetaError, match="more than a theta file holds"):
            load_theta(big)


def test_shipped_theta_is_checked_against_its_record(monkeypatch, tmp_path, random_theta):
    import celo2.theta_files as theta_module

    shipped = load_theta()
    assert shipped.checksum() == shipped.metadata["theta_sha256"]
    path = save_theta(random_theta, tmp_path / "celo2_theta.state")
    path.with_suffix(".json").write_text(json.dumps({"theta_sha256": "0000000000000000"}))
    monkeypatch.setattr(theta_module, "default_theta_path", lambda: path)
    with pytest.raises(ThetaError, match="shipped theta hashes to .* corrupted"):
        load_theta()


def _cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    from celo2.cli.main import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.mark.parametrize("where", ["folder", "folder-with-suffix", "under-a-file", "unwritable"])
def test_convert_to_a_bad_destination_is_one_error_line(capsys, tmp_path, where):
    source = str(save_theta(celo2.Theta.init(), tmp_path / "in.state"))
    (tmp_path / "out.state").mkdir()
    (tmp_path / "a-file").write_text("x")
    dest = {
        "folder": str(tmp_path) + os.sep,
        "folder-with-suffix": str(tmp_path / "out.state"),
        "under-a-file": str(tmp_path / "a-file" / "theta.state"),
        "unwritable": "/proc/celo2-theta.state",
    }[where]
    code, err, out = _cli(capsys, "theta", "convert", source, dest)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and not out
    assert dest.rstrip(os.sep) in err[0]


def test_show_on_bad_files_is_one_error_line(capsys, tmp_path):
    bomb = tmp_path / "bomb.state"
    bomb.write_bytes(nested_ext_bomb(40))
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02}q\x00.")
    (tmp_path / "half.npz").write_bytes(save_theta(celo2.Theta.init(), tmp_path / "x.npz").read_bytes()[:900])
    for bad in (bomb, tmp_path / "junk.pt", tmp_path / "half.npz", tmp_path / "missing.state", "/dev/zero", "a\0b"):
        code, err, out = _cli(capsys, "theta", "show", str(bad))
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (bad, err)


def test_bench_theta_specs_raise_only_spec_errors_for_bad_files(tmp_path):
    from celo2.eval.theta_specs import ThetaSpecError, load_labelled_thetas

    bomb = tmp_path / "bomb.state"
    bomb.write_bytes(nested_ext_bomb(40))
    for spec in (f"x={bomb}", f"y={tmp_path}", f"z={tmp_path / 'nope.pt'}", "w=/dev/zero"):
        with pytest.raises(ThetaSpecError, match="--theta"):
            load_labelled_thetas([spec])
