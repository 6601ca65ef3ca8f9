"""A Flax (NNX) training loop with Celo2 from optax.

    python examples/flax_optax.py            # a few hundred steps
    python examples/flax_optax.py --tiny     # a few steps (what the test suite runs)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from celo2.optax import celo2, routing_table


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(32, 64, rngs=rngs)
        self.head = nnx.Linear(64, 4, rngs=rngs)  # "head": routed to AdamW by name

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jax.nn.relu(self.hidden(x)))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="run a few steps only")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    steps = 5 if args.tiny else args.steps

    key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_x, (1024, 32))
    w_true = jax.random.normal(key_w, (32, 4))
    y = jnp.argmax(x @ w_true, axis=1)  # a learnable stand-in for a real dataset

    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, max(1, steps // 20), steps)
    tx = celo2(schedule, weight_decay=0.1)
    print(routing_table(params))
    opt_state = tx.init(params)

    def loss_fn(params, xb, yb):
        logits = nnx.merge(graphdef, params)(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def train_step(params, opt_state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for step in range(steps):
        idx = jax.random.randint(jax.random.PRNGKey(step), (64,), 0, x.shape[0])
        params, opt_state, loss = train_step(params, opt_state, x[idx], y[idx])
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  train loss {float(loss):.4f}")
    final = float(loss_fn(params, x, y))
    print(f"full-data loss {final:.4f}")
    return final


if __name__ == "__main__":
    main()
