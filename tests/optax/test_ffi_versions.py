"""The CPU kernels' FFI handler runs only on the jax/jaxlib versions it supports; elsewhere XLA's formulation, once warned."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("optax")

from celo2.optax import cpu_ffi, transform  # noqa: E402


@pytest.mark.parametrize("jax_v, jaxlib_v, ok", [
    ("0.10.2", "0.10.2", True),
    ("0.10.7", "0.10.9", True),
    ("0.10.3.dev20260101", "0.10.3", True),
    ("0.10.1", "0.10.2", False),
    ("0.11.0", "0.10.2", False),
    ("0.11.0rc1", "0.11.0rc1", False),
    ("0.4.30", "0.4.30", False),
    ("1.0.0", "1.0.0", False),
])
def test_supported_versions(jax_v, jaxlib_v, ok):
    assert cpu_ffi.supported_versions(jax_v, jaxlib_v) is ok


def test_installed_versions_are_supported():
    """The suite runs on a supported pair, or the fast path's own tests would test nothing."""
    import jax

    assert cpu_ffi.VERSIONS_SUPPORTED, f"jax {jax.__version__} is outside {cpu_ffi.SUPPORTED_JAX}: widen it after testing"


def test_unsupported_versions_fall_back_to_xla_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu_ffi, "VERSIONS_SUPPORTED", False)
    monkeypatch.setattr(cpu_ffi, "AVAILABLE", False)
    monkeypatch.setattr(cpu_ffi, "_WARNED", False)
    monkeypatch.setattr(cpu_ffi.kernels, "AVAILABLE", True)
    with pytest.warns(RuntimeWarning, match="outside the range.*XLA's formulation"):
        assert transform._resolve_cpu_kernels(None, traced_theta=False) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert transform._resolve_cpu_kernels(None, traced_theta=False) is False  # once only
        assert transform._resolve_cpu_kernels(False, traced_theta=False) is False
    with pytest.raises(ValueError, match="cpu_kernels=True cannot run: jax .* outside the range"):
        transform._resolve_cpu_kernels(True, traced_theta=False)
