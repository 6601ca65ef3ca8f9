"""Experiment: does more task diversity help transfer? The cpu preset on six
families: the shipped theta's four plus two generated here through the
task-family interface (``register_task_family``).

    python six_tasks.py check                      # the pink-teacher family's difficulty
    python six_tasks.py RUN_DIR DATA               # meta-train into RUN_DIR (DATA: MNIST/Fashion-MNIST IDX)
"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import numpy as np
from celo2.metatrain import TaskFamily, register_task_family, preset, meta_train
from celo2.data.builtin import make_synthetic


def synthetic_s1(root, size):
    X, y = make_synthetic(10_000, seed=1, stream=0)
    assert size == 8
    return X.reshape(len(X), -1), y


def pink_teacher(root, size, n=20_000):
    """8x8 images with a 1/f amplitude spectrum (natural-image statistics), labels
    sampled from a random ReLU teacher's softmax (temperature gives label noise)."""
    rng = np.random.default_rng(7)
    fy = np.fft.fftfreq(size)[:, None]; fx = np.fft.fftfreq(size)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2); f[0, 0] = 1.0 / size
    spec = (rng.normal(size=(n, size, size)) + 1j * rng.normal(size=(n, size, size))) / f
    img = np.real(np.fft.ifft2(spec))
    lo = img.min(axis=(1, 2), keepdims=True); hi = img.max(axis=(1, 2), keepdims=True)
    X = ((img - lo) / (hi - lo)).reshape(n, -1).astype(np.float32)
    Z = (X - X.mean(0)) / X.std(0)
    W1 = rng.normal(size=(size * size, 64)) / size; W2 = rng.normal(size=(64, 10)) / 8
    logits = np.maximum(Z @ W1, 0) @ W2
    logits = logits - logits.mean(0)
    logits = 3.0 * logits / logits.std()
    y = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
    return X, y.astype(np.int64)


register_task_family(TaskFamily("synthetic-s1", synthetic_s1, False, "synthetic, prototypes from seed 1"))
register_task_family(TaskFamily("pink-teacher", pink_teacher, False, "1/f noise images, random teacher labels"))

if __name__ == "__main__":
    if sys.argv[1] == "check":
        X, y = pink_teacher(None, 8)
        print(X.shape, X.min(), X.max(), np.bincount(y))
        from sklearn.neural_network import MLPClassifier
        from sklearn.linear_model import LogisticRegression
        for m in (LogisticRegression(max_iter=500), MLPClassifier((32,), max_iter=200)):
            m.fit(X[:15000], y[:15000]); print(type(m).__name__, m.score(X[15000:], y[15000:]))
        sys.exit()
    cfg = preset("cpu", tasks=("mnist", "fashion-mnist", "digits", "synthetic", "synthetic-s1", "pink-teacher"),
                 pairs_per_task=3, data_dir=sys.argv[2])
    meta_train(cfg, sys.argv[1], progress=False)
