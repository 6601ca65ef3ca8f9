"""The fast PyTorch path computes the straightforward formula, chunked or not,
never moves a value to the host, and traces under torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from celo2.torch import Celo2, Celo2Base
from celo2.kernels import cpu as cpu_kernels
from celo2.torch import functional, ns, rule
from celo2.torch.backends import numba as _numba
from celo2.torch.backends import torch as _chunked
from celo2.torch.backends.reference import reference_newton_schulz

# 0-D, 1-D, both matrix orientations and a square one, a column and a row
# (size-1 axes), 3-D with factored axes inside a slice, at the front, and 4-D
# conv kernels, one with a single input channel; ties in size too.
SHAPES = [(), (1,), (37,), (24, 7), (7, 24), (12, 12), (7, 1), (1, 7), (3, 10, 9), (9, 10, 3), (6, 5, 3, 3),
          (5, 1, 3, 3), (2, 1, 5, 3)]
CHUNKS = [None, 1, 13]  # default, one leading slice per chunk, uneven chunks


def _ids(shape):
    return "x".join(map(str, shape)) or "scalar"


@pytest.fixture(params=["cpu-kernels", "torch-ops"])
def matrix_path(request, monkeypatch):
    """Run a test once through the fused CPU kernels for float32 matrices and
    once through the PyTorch path (what accelerators and other dtypes take)."""
    if request.param == "cpu-kernels" and not cpu_kernels.AVAILABLE:
        pytest.skip("numba is not installed: the fused CPU kernels are unavailable")
    monkeypatch.setattr(functional, "USE_CPU_KERNELS", request.param == "cpu-kernels")
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("orthogonalize", [False, True])
def test_fast_step_equals_the_reference_formula(random_theta, shape, orthogonalize, matrix_path):
    theta = rule.TorchTheta.from_theta(random_theta)
    g = torch.Generator().manual_seed(len(shape) * 100 + sum(shape))
    param = torch.randn(shape, generator=g) * 0.5
    ref_state = rule.init_tensor_state(param)
    states = {c: rule.init_tensor_state(param) for c in CHUNKS}
    for t in range(4):
        grad = torch.randn(shape, generator=g) * 10.0 ** (t - 2)
        if t == 2 and grad.numel():
            grad.view(-1)[0] = 5000.0  # clipped to 1000
        expected = rule.reference_tensor_step(theta, ref_state, grad, param, orthogonalize)
        for chunk, state in states.items():
            got = rule.tensor_step(theta, state, grad, param, orthogonalize, chunk_elements=chunk)
            assert got.shape == param.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=0, atol=5e-5, msg=f"chunk={chunk} step {t}")
            for key in ref_state:
                torch.testing.assert_close(state[key], ref_state[key], rtol=1e-5, atol=1e-6)
        param = param - 0.01 * expected


def test_slices_are_recursed_into_when_a_slice_exceeds_a_chunk(random_theta, matrix_path):
    """(2, 12, 10): the factored axes lie inside each slice; a chunk of 5
    elements is smaller than one slice, so each slice runs as its own matrix."""
    theta = rule.TorchTheta.from_theta(random_theta)
    param = torch.randn(2, 12, 10)
    s1, s2 = rule.init_tensor_state(param), rule.init_tensor_state(param)
    for _ in range(2):
        grad = torch.randn(2, 12, 10)
        expected = rule.reference_tensor_step(theta, s1, grad, param, True)
        got = rule.tensor_step(theta, s2, grad, param, True, chunk_elements=5)
        torch.testing.assert_close(got, expected, rtol=0, atol=5e-5)


@pytest.mark.parametrize("orthogonalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_step_equals_direction_then_update(random_theta, orthogonalize, dtype, matrix_path):
    """The optimizer's in-place update is ``p (1 - lr wd) - lr * direction``."""
    theta = rule.TorchTheta.from_theta(random_theta)
    for shape in [(30, 20), (4, 5, 3, 3), (17,)]:
        param = (torch.randn(shape) * 0.3).to(dtype)
        grad = torch.randn(shape).to(dtype)
        s1, s2 = rule.init_tensor_state(param), rule.init_tensor_state(param)
        direction = rule.tensor_step(theta, s1, grad, param, orthogonalize)
        expected = (param.float() * (1 - 0.1 * 0.5) - 0.1 * direction).to(dtype)
        got = param.clone()
        rule.apply_step(theta, s2, grad, got, orthogonalize, 0.1, 0.5, chunk_elements=7)
        tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got, expected, **tol)


class _NoHostSync(TorchFunctionMode):
    """Fails on any conversion of a tensor to a Python value: on an accelerator
    each would wait for the device (``.item()``, ``bool(t)``, ``float(t)``...)."""

    BANNED = {
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
        torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise AssertionError(f"host sync in the step: {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_the_learned_step_never_reads_a_tensor_value_on_the_host(random_theta, monkeypatch):
    """Every path of the rule (scalar, vector, both matrix orientations,
    chunked, N-D, Newton-Schulz, weight decay, tensor lr) under a mode that
    rejects tensor -> Python conversions. This is the PyTorch path, the one
    accelerators take (the CPU kernels read host memory by design)."""
    monkeypatch.setattr(functional, "USE_CPU_KERNELS", False)
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in [(), (9,), (40, 30), (30, 40), (4, 3, 3, 3), (2, 12, 10)]]
    for p in params:
        p.grad = torch.randn_like(p)
    base = Celo2Base(params, lr=1e-2, weight_decay=0.1, theta=random_theta)
    orth = Celo2([{"params": params, "branch": "celo2"}], lr=torch.tensor(1e-2), weight_decay=0.1,
                 theta=random_theta)
    old = _chunked.CHUNK_ELEMENTS
    _chunked.CHUNK_ELEMENTS = 64  # several chunks per tensor, slices recursed into
    try:
        for _ in range(2):
            with _NoHostSync():
                base.step()
                orth.step()
    finally:
        _chunked.CHUNK_ELEMENTS = old
    for p in params:
        assert torch.isfinite(p).all()


@pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")
@pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")
def test_cpu_kernels_take_matrices_vectors_and_conv_kernels(random_theta, monkeypatch):
    """Which float32 CPU tensors the kernels take (the rest, e.g. a 3-D tensor,
    stays on the PyTorch path)."""
    monkeypatch.setattr(functional, "USE_CPU_KERNELS", True)
    taken = []
    for module, name in ((cpu_kernels, "matrix_step"), (cpu_kernels, "vector_step"), (cpu_kernels, "conv_step")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real: (taken.append(_n), _f(*a))[1])
    monkeypatch.setattr(cpu_kernels, "ensure_compiled", lambda kernel, args: None)  # the wrappers are Python
    theta = rule.TorchTheta.from_theta(random_theta)
    for shape in [(20, 30), (7,), (), (8, 6, 3, 3), (3, 10, 9)]:
        p = torch.randn(shape)
        rule.tensor_step(theta, rule.init_tensor_state(p), torch.randn(shape), p, True)
    assert taken == ["matrix_step", "vector_step", "vector_step", "conv_step"]


def test_cpu_kernels_are_compiled_with_non_aliasing_arrays():
    """The kernels reach Numba's ``noalias`` compiler flag through a private
    hook; if a Numba release moves it, they stay correct but run ~5x slower,
    and this test says so."""
    assert cpu_kernels.NOALIAS, "numba's _customize_flags hook is gone: CPU kernels compile without noalias"


@pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")
def test_cpu_kernels_give_the_same_bits_on_any_thread_count(random_theta):
    """Partial sums are per row block, not per thread, so a step's result does
    not depend on how many threads ran it. (Newton-Schulz is left out: its
    matrix products are PyTorch's, whose blocking follows the thread count.)"""
    theta = rule.TorchTheta.from_theta(random_theta)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            torch.manual_seed(1)
            # a matrix and a conv kernel, each of several row blocks
            for shape in [(300, 300), (96, 80, 3, 3)]:
                param, grad = torch.randn(shape), torch.randn(shape)
                state = rule.init_tensor_state(param)
                results.append(rule.tensor_step(theta, state, grad, param, False))
                p = param.clone()
                rule.apply_step(theta, state, grad, p, False, 1e-2, 0.1)
                results += [p, *state.values()]
    finally:
        torch.set_num_threads(old)
    half = len(results) // 2
    for a, b in zip(results[:half], results[half:]):
        assert torch.equal(a, b)


@pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")
def test_cpu_kernels_ask_for_512_bit_vectors_on_our_functions_only():
    """The kernels' pipeline marks their LLVM functions ``prefer-vector-width
    = 512`` (AVX-512 machines then run the MLP on twice the lanes); if a Numba
    release moves the hooks, the kernels fall back to the plain pipeline and
    this test says so. Other Numba code in the process is left alone."""
    import numba

    assert cpu_kernels.WIDE, "numba's lowering hooks moved: CPU kernels compile for 256-bit vectors"

    def probe(x):
        return x + 1.0

    ours = cpu_kernels._kernel(probe, cache=False)  # compiled here, so its IR can be read
    ours.compile((numba.float32,))
    assert '"prefer-vector-width"="512"' in ours.inspect_llvm(ours.signatures[0])
    theirs = numba.njit(probe)
    theirs.compile((numba.float32,))
    assert "prefer-vector-width" not in theirs.inspect_llvm(theirs.signatures[0])


@pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")
def test_whole_tensors_on_threads_give_the_same_bits_as_one_thread(random_theta):
    """Celo2Base hands whole tensors to threads (cpu_kernels.run_tensors):
    the parameters and state after three steps are bit for bit those of a
    single thread, for a model mixing matrices, vectors, a conv kernel and a
    3-D tensor (which stays on the calling thread, on the chunked PyTorch path:
    PyTorch's own kernels may round differently with another thread count, so
    that one is compared to float32 rounding)."""
    shapes = [(300, 200), (64, 64), (200, 300), (50,), (), (16, 8, 3, 3), (3, 10, 9), (7, 1)]
    chunked = shapes.index((3, 10, 9))
    runs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            torch.manual_seed(3)
            params = [nn.Parameter(torch.randn(s)) for s in shapes]
            opt = Celo2Base(params, lr=1e-2, weight_decay=0.1, theta=random_theta)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
            runs.append([(i, t.clone()) for i, p in enumerate(params) for t in (p, *opt.state[p].values())])
    finally:
        torch.set_num_threads(old)
    for other in runs[1:]:
        for (i, a), (_, b) in zip(runs[0], other):
            if i == chunked:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(a, b), f"the tensor of shape {shapes[i]} differs between thread counts"


@pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")
def test_run_tensors_finishes_every_share_before_raising(monkeypatch):
    """A failing tensor's error reaches the caller only after the other
    threads' tensors are done, so none is left half-updated behind it."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    done = []

    def boom():
        raise ValueError("bad tensor")

    tasks = [(10, boom)] + [(1, (lambda i=i: done.append(i))) for i in range(6)]
    with pytest.raises(ValueError, match="bad tensor"):
        cpu_kernels.run_tensors(tasks)
    assert sorted(done) == list(range(6))


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (260, 260)], ids=_ids)
def test_newton_schulz_in_place_by_column_blocks_equals_the_reference(shape):
    """Large matrices are orthogonalised in their own storage, a quarter of
    the columns at a time (Celo2's step then holds one matrix, not three)."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    assert x.numel() > ns.NS_INPLACE_MIN
    expected = reference_newton_schulz(x)
    work = x.clone()
    out = rule.newton_schulz(work, inplace=True)
    assert out.data_ptr() == work.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rule.newton_schulz(x), expected, rtol=1e-4, atol=1e-5)


def test_torch_compile_of_the_step_matches_eager(random_theta):
    """``fullgraph=True``: the compiled step has no graph break, which also
    proves it holds no host sync (``.item()`` or a data-dependent branch would
    break the graph)."""
    try:
        import torch._inductor  # noqa: F401
    except Exception as exc:  # pragma: no cover - compiler missing from this build
        pytest.skip(f"torch.compile unavailable here: {exc}")
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 6)
    models = [nn.Linear(4, 6) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [Celo2(m.named_parameters(), lr=1e-2, weight_decay=0.01, theta=random_theta) for m in models]

    def grads(model):
        model.zero_grad()
        ((model(x) - y) ** 2).mean().backward()

    for m, o in zip(models, opts):  # eager first step: the state exists before tracing
        grads(m)
        o.step()
    compiled = torch.compile(opts[1].step, fullgraph=True)
    for _ in range(3):
        grads(models[0])
        opts[0].step()
        grads(models[1])
        compiled()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert set(opts[1].state[models[1].weight]) == {"m", "v", "fac_r", "fac_c", "nonfinite_steps"}


def test_optimizer_workspace_is_small_and_reused(random_theta, monkeypatch):
    """The chunk scratch of the PyTorch path is bounded by the chunk size, not
    the tensor size."""
    monkeypatch.setattr(functional, "USE_CPU_KERNELS", False)
    p = nn.Parameter(torch.randn(300, 200))
    p.grad = torch.randn_like(p)
    opt = Celo2Base([p], theta=random_theta)
    old = _chunked.CHUNK_ELEMENTS
    _chunked.CHUNK_ELEMENTS = 1000
    try:
        opt.step()
        ws = opt._workspace_by_device[p.device].buf
        first = ws.data_ptr()
        opt.step()
        assert opt._workspace_by_device[p.device].buf.data_ptr() == first
        assert ws.numel() <= _chunked.WS_SIZE * 1000
    finally:
        _chunked.CHUNK_ELEMENTS = old
    state_copy = copy.deepcopy(opt.state_dict())
    assert "_workspace" not in str(state_copy.keys())
