"""The PES estimator's pieces: meta-loss clipping, non-finite handling, accumulators, unbiasedness."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celo2.metatrain.pes import clip_meta_loss, pes_pair_gradient, zero_nonfinite

CLIP = 1.5 * math.log(10.0)


def test_meta_loss_is_clipped_and_nonfinite_counts_as_the_clip():
    raw = jnp.asarray([-1.0, 0.0, 1.0, 3.0, 10.0, jnp.nan, jnp.inf, -jnp.inf])
    got = np.asarray(clip_meta_loss(raw, CLIP))
    want = np.asarray([0.0, 0.0, 1.0, 3.0, CLIP, CLIP, CLIP, CLIP], np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_nonfinite_gradient_entries_are_zeroed_others_kept():
    g = {"a": jnp.asarray([1.0, jnp.nan, -2.0]), "b": jnp.asarray([[jnp.inf, 0.5]])}
    out = zero_nonfinite(g)
    np.testing.assert_array_equal(np.asarray(out["a"]), [1.0, 0.0, -2.0])
    np.testing.assert_array_equal(np.asarray(out["b"]), [[0.0, 0.5]])


def test_accumulator_grows_then_restarts_at_a_reset():
    std = 0.5
    eps = {"t": jnp.asarray([[1.0, 2.0], [3.0, 4.0]])}
    acc = {"t": jnp.asarray([[10.0, 10.0], [10.0, 10.0]])}
    d_before = jnp.asarray([1.0, 0.0])
    d_after = jnp.asarray([0.0, 2.0])
    reset = jnp.asarray([False, True])
    grad, new_acc = pes_pair_gradient(d_before, d_after, eps, acc, reset, std)
    scale = 1.0 / (2 * std**2)
    # pair 0, no reset: losses depend on all perturbations so far (acc + eps).
    np.testing.assert_allclose(np.asarray(grad["t"][0]), scale * 1.0 * np.asarray([11.0, 12.0]))
    # pair 1, reset before its losses: only this truncation's eps matters.
    np.testing.assert_allclose(np.asarray(grad["t"][1]), scale * 2.0 * np.asarray([3.0, 4.0]))
    np.testing.assert_allclose(np.asarray(new_acc["t"]), [[11.0, 12.0], [3.0, 4.0]])


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _toy_unroll(theta_pm, x, step, T, L, alpha, target):
    """Inner runs of the toy: x <- x - alpha (x - theta); loss 0.5|x - target|^2; reset to 0 after L steps.

    Mirrors the engine's order: reset check, loss on the current state, update.
    """
    losses, after = [], []
    was = jnp.zeros(step.shape, bool)
    for _ in range(T):
        done = step >= L
        x = jnp.where(done[:, None], 0.0, x)
        step = jnp.where(done, 0, step)
        was = was | done
        losses.append(0.5 * jnp.sum((x - target) ** 2, axis=1))
        after.append(was)
        x = x - alpha * (x - theta_pm)
        step = step + 1
    return x, step, jnp.stack(losses), jnp.stack(after)


def test_pes_matches_the_true_gradient_on_a_quadratic_toy_and_beats_truncated_es():
    """With a long inner-run history the accumulator is what makes the estimate unbiased."""
    d, N, T, L, alpha, std = 4, 4000, 5, 30, 0.1, 0.01
    theta = jnp.asarray([0.5, -1.0, 2.0, 0.3])
    target = jnp.asarray([1.0, 0.0, 1.0, 0.0])
    key = jax.random.PRNGKey(0)
    step = jax.random.randint(key, (N,), 0, L)
    x = theta[None] + (1 - alpha) ** step[:, None] * (0.0 - theta[None])
    xp, xn, sp, sn = x, x, step, step
    acc = {"t": jnp.zeros((N, d))}

    def truncation_loss(th, s0):
        """Mean truncation loss when theta ``th`` was used since the run began (exact gradient target)."""
        xs = th + (1 - alpha) ** s0 * (0.0 - th)
        _, _, losses, _ = _toy_unroll(th[None], xs[None], jnp.asarray([s0]), T, L, alpha, target)
        return jnp.mean(losses)

    true_grad = jax.jit(jax.vmap(jax.grad(truncation_loss), in_axes=(None, 0)))
    for k in range(12):
        eps = {"t": std * jax.random.normal(jax.random.fold_in(key, k + 1), (N, d))}
        s_start = sp
        xp, sp, lp, ap = _toy_unroll(theta + eps["t"], xp, sp, T, L, alpha, target)
        xn, sn, ln, an = _toy_unroll(theta - eps["t"], xn, sn, T, L, alpha, target)
        assert bool(jnp.all(ap == an)) and bool(jnp.all(sp == sn))  # + and - share resets
        d_before = (jnp.sum(jnp.where(ap, 0, lp), 0) - jnp.sum(jnp.where(an, 0, ln), 0)) / T
        d_after = (jnp.sum(jnp.where(ap, lp, 0), 0) - jnp.sum(jnp.where(an, ln, 0), 0)) / T
        old_acc = acc
        grads, acc = pes_pair_gradient(d_before, d_after, eps, acc, ap[-1], std)
        if k >= 8:  # every run has restarted at least once: the whole history used theta +- eps
            truth = np.asarray(jnp.mean(true_grad(theta, s_start), axis=0))
            est = np.asarray(jnp.mean(grads["t"], axis=0))
            rel = np.linalg.norm(est - truth) / np.linalg.norm(truth)
            assert rel < 0.1, (k, est, truth)
            tes, _ = pes_pair_gradient(d_before, d_after, eps, {"t": jnp.zeros_like(old_acc["t"])},
                                       ap[-1], std)
            rel_tes = np.linalg.norm(np.asarray(jnp.mean(tes["t"], 0)) - truth) / np.linalg.norm(truth)
            assert rel_tes > 0.3  # the test can tell PES from truncated ES


@pytest.mark.parametrize("augmentation", ["none", "global", "tensor", "parameter"])
def test_fresh_runs_draw_scales_lengths_and_weights_as_configured(augmentation):
    from celo2.metatrain import preset
    from celo2.metatrain.pes import PES

    c = preset("smoke", augmentation=augmentation, inner_optimizer="adam")
    pes = PES(c, num_tasks=1)
    keys = jax.random.split(jax.random.PRNGKey(1), 64)
    runs = jax.jit(jax.vmap(lambda k: pes._draw_run(k, jnp.zeros(347))))(keys)
    scales = {k: np.asarray(v) for k, v in runs.scale.items()}
    if augmentation == "none":
        assert all(np.all(v == 1.0) for v in scales.values())
    else:
        flat = np.concatenate([v.reshape(64, -1) for v in scales.values()], axis=1)
        assert flat.min() >= 1e-3 * (1 - 1e-6) and flat.max() <= 1e3 * (1 + 1e-6)
        logs = np.log10(flat)
        assert logs.std() > 1.0  # log-uniform over six decades has std ~1.7
        if augmentation == "global":
            assert np.all(flat == flat[:, :1])
        if augmentation == "tensor":
            assert all(v.shape == (64,) for v in scales.values())
        if augmentation == "parameter":
            assert scales["w0"].shape == (64, 64, 32) and len(np.unique(scales["w0"][0])) > 100
    # Stored weights are w / s: the model sees w = stored * s, with std ~ 1/sqrt(fan_in).
    w0 = np.asarray(runs.params["w0"]) * scales["w0"].reshape(64, *([1] * 2) if scales["w0"].ndim == 1 else scales["w0"].shape[1:])
    assert abs(w0.std() - 1 / 8) < 0.01
    assert np.all(np.asarray(runs.params["b0"]) == 0)
    lengths = np.asarray(runs.length)
    assert lengths.min() >= c.min_unroll_length and lengths.max() <= c.max_unroll_length
