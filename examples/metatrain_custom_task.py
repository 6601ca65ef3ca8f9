"""Meta-train a theta on a task family of your own, then use it in PyTorch.

    python examples/metatrain_custom_task.py --out runs/stripes             # a short real run (minutes)
    python examples/metatrain_custom_task.py --tiny --out /tmp/stripes      # seconds (what the tests run)

The family below generates 8x8 images ("stripes": class k has a bright row k); any loader returning
``(X, y)`` with ``X`` float32 ``(N, size*size)`` in ``[0, 1]`` and integer labels in ``[0, 10)`` works.
"""

from __future__ import annotations

import argparse

import numpy as np

from celo2.metatrain import TaskFamily, preset, register_task_family
from celo2.metatrain.trainer import meta_train


def load_stripes(data_root: str | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``data_root`` is unused (``needs_data_root=False``); ``size`` is the run's image size (8)."""
    rng = np.random.default_rng(0)
    n = 2000
    y = rng.integers(0, 10, n)
    X = rng.random((n, size, size), dtype=np.float32) * 0.2
    for i, label in enumerate(y):  # class k: a bright row k % size, a bright column on half the classes
        X[i, label % size, :] = 1.0
        if label >= size:
            X[i, :, label % size] = 1.0
    return X.reshape(n, size * size), y


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder (must be new, or pass --resume)")
    parser.add_argument("--tiny", action="store_true", help="the smoke preset's 3 iterations")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    register_task_family(TaskFamily("stripes", load_stripes, needs_data_root=False,
                                    description="generated 8x8 stripes"), replace=True)
    if args.tiny:
        config = preset("smoke", tasks=("stripes", "digits"))
    else:
        config = preset("smoke", tasks=("stripes", "digits"), iterations=200)
    result = meta_train(config, args.out, resume=args.resume)
    print(f"theta written to {args.out}/theta.state")

    # The new theta drives the optimizer like the shipped one.
    import torch
    from celo2.torch import Celo2

    model = torch.nn.Linear(16, 4)
    opt = Celo2(model.named_parameters(), lr=1e-3, theta=result.theta)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    return result


if __name__ == "__main__":
    main()
