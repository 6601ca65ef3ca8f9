"""How hard the photo task families are: test accuracy of a linear model and the 64-32-10 MLP.

Each family's train split trains two classifiers on the raw 8x8 pixels in [0, 1] (the
meta-training view), scored on its test split:

* linear: scikit-learn ``LogisticRegression`` (lbfgs, up to 1,000 iterations);
* MLP: scikit-learn ``MLPClassifier`` with one hidden layer of 32 ReLU units (64-32-10, the
  meta-training task's network), Adam at lr 1e-3, batch 64, a fixed number of epochs.

Beside the photo families (``celo2.data.photos``) it scores MNIST and Fashion-MNIST at 8x8
(and CIFAR-10 / SVHN when their files are in the data folder), read by ``celo2.data``, and the
generated stand-ins ``digits`` and ``synthetic`` that the ``cpu`` preset uses.

    python benchmarks/photo_families.py --data-dir ../shared/datasets
    python benchmarks/photo_families.py --families photo-patches --epochs 5 --no-write

Prints a table and writes ``benchmarks/results/photo-families/{README.md,results.csv}``
(``--out`` to change, ``--no-write`` not to).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from pathlib import Path

import numpy as np

PHOTO = ("photo-patches", "photo-faces")
FILE = ("mnist", "fashion-mnist", "cifar10", "svhn")
BUILTIN = ("digits", "synthetic")


def load(name: str, data_dir: str | None):
    """``(X_train, y_train, X_test, y_test)`` of a family, flat 8x8 in [0, 1]; ``None`` if its files are absent."""
    if name in PHOTO:
        from celo2.data.photos import load_photo_family

        return (*load_photo_family(name, "train"), *load_photo_family(name, "test"))
    from celo2 import data

    try:
        return (*data.load_task_images(name, "train", root=data_dir),
                *data.load_task_images(name, "test", root=data_dir))
    except data.DatasetNotFoundError:
        return None


def score(X, y, Xt, yt, epochs: int, seed: int) -> tuple[float, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        linear = LogisticRegression(max_iter=1000).fit(X, y).score(Xt, yt)
        mlp = MLPClassifier(hidden_layer_sizes=(32,), solver="adam", learning_rate_init=1e-3,
                            batch_size=64, max_iter=epochs, random_state=seed).fit(X, y).score(Xt, yt)
    return float(linear), float(mlp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="folder with mnist/, fashion-mnist/ (else $CELO2_DATA_DIR)")
    ap.add_argument("--families", default=",".join(PHOTO + FILE + BUILTIN), help="comma-separated")
    ap.add_argument("--epochs", type=int, default=20, help="MLP epochs (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "photo-families"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    rows = []
    print(f"{'family':<15} {'train':>7} {'test':>6} {'linear':>7} {'MLP':>7} {'s':>5}")
    for name in [f.strip() for f in args.families.split(",") if f.strip()]:
        t0 = time.perf_counter()
        split = load(name, args.data_dir)
        if split is None:
            print(f"{name:<15} (files not found under --data-dir; skipped)")
            continue
        X, y, Xt, yt = split
        linear, mlp = score(X, y, Xt, yt, args.epochs, args.seed)
        row = {"family": name, "train": len(y), "test": len(yt), "linear_acc": round(linear, 4),
               "mlp_acc": round(mlp, 4), "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{name:<15} {len(y):>7} {len(yt):>6} {linear:>7.3f} {mlp:>7.3f} {row['seconds']:>5.0f}", flush=True)

    if args.no_write or not rows:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = "\n".join(f"| {r['family']} | {r['train']} | {r['test']} | {r['linear_acc']:.3f} | {r['mlp_acc']:.3f} |"
                      for r in rows)
    readme = out / "README.md"
    notes = ""
    if readme.is_file():  # keep the hand-written notes below the generated table
        text = readme.read_text()
        marker = "<!-- notes -->"
        notes = text[text.index(marker):] if marker in text else ""
    readme.write_text(
        "# Photo task families: how hard they are\n\n"
        f"`python benchmarks/photo_families.py --epochs {args.epochs} --seed {args.seed}`: test accuracy "
        "on the 8x8 grey meta-training view (raw pixels in [0, 1]) of a linear model (LogisticRegression) "
        f"and the 64-32-10 ReLU MLP (MLPClassifier, Adam lr 1e-3, batch 64, {args.epochs} epochs). "
        "Chance is 0.100.\n\n"
        "| family | train | test | linear | MLP |\n|---|---|---|---|---|\n" + table + "\n\n" + notes
    )
    print(f"wrote {out / 'README.md'} and {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
