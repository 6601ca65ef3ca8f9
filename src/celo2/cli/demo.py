"""``celo2 demo``: Celo2 against AdamW on a small task, on a CPU, in about a minute.

Both optimizers train the same MLP from the same initialisation on the same
batches in the same order, for the same number of steps, with the same
warmup + cosine schedule; each gets a small learning-rate grid and the
learning rate with the lowest validation loss is reported. Validation data
are held out from the training split (the test split is only used for the
final report), so the comparison is not tuned on the test set.

The default task is the built-in ``synthetic`` 8x8 problem (no download; see
:mod:`celo2.data.builtin`), hard enough that the optimizers differ;
``--dataset digits`` uses scikit-learn's real handwritten digits, and
``--dataset mnist --data-dir DIR`` any downloaded dataset of the task set.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from celo2._io import atomic_write_group
from celo2.cli.main import nonnegative_float, positive_float, positive_int, seed_int

DEFAULT_STEPS = 1000
QUICK_STEPS = 60
#: Learning-rate grids. Celo2's lr is the step size of its unit-RMS matrix
#: updates (AdamW on biases and the head runs at 20x), so its good values lie
#: lower than AdamW's; each grid brackets its optimizer's optimum on the
#: default task.
CELO2_LRS = (3e-4, 1e-3, 3e-3)
ADAMW_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
#: --quick: 60 steps of a small model, where the larger of the grid values learns fastest.
QUICK_CELO2_LRS = (3e-3,)
QUICK_ADAMW_LRS = (1e-2,)
VAL_FRACTION = 0.15


@dataclass
class RunResult:
    """One training run: an optimizer at one learning rate."""

    optimizer: str
    lr: float
    train_curve: list[float] = field(default_factory=list)  # batch loss at every step
    val_steps: list[int] = field(default_factory=list)
    val_curve: list[float] = field(default_factory=list)
    initial_train_loss: float = float("nan")
    final_train_loss: float = float("nan")  # on the whole training split, after the last step
    val_loss: float = float("nan")
    test_loss: float = float("nan")
    test_acc: float = float("nan")
    wall_s: float = 0.0
    diverged: bool = False
    best: bool = False


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small MLP with Celo2 and with AdamW and compare (CPU, about a minute)",
        description=(
            "Train the same MLP with Celo2 and with AdamW (same init, data order, steps and "
            "warmup + cosine schedule, a small learning-rate grid each, chosen on held-out "
            "validation data), print a comparison table and write loss curves (PNG) and "
            "results (JSON) to --out. Needs no download and runs in about a minute on a CPU."
        ),
    )
    p.add_argument("--steps", type=positive_int, default=None, help=f"training steps per run (default {DEFAULT_STEPS}; {QUICK_STEPS} with --quick)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the initialisation, data order and validation split (default 0)")
    p.add_argument("--out", default="celo2-demo", help="output folder for the plot and results (default celo2-demo/)")
    p.add_argument("--theta", default=None, help="theta file to use instead of the one shipped with celo2 (.state, .npz, .pt or hf://owner/repo)")
    p.add_argument("--quick", action="store_true", help="a tiny run (one learning rate each, small model) for smoke tests")
    p.add_argument("--dataset", default="synthetic", help="task dataset (default synthetic; digits needs no download either; mnist, fashion-mnist, cifar10, svhn need --data-dir)")
    p.add_argument("--data-dir", default=None, help="data root for downloaded datasets (default $CELO2_DATA_DIR)")
    p.add_argument("--hidden", type=positive_int, default=None, help="hidden width of the two-layer MLP (default 128; 32 with --quick)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="decoupled weight decay, the same for both optimizers (default 0)")
    p.add_argument("--celo2-lr", type=positive_float, nargs="+", default=None, help=f"Celo2 learning-rate grid (default {' '.join(map(str, CELO2_LRS))})")
    p.add_argument("--adamw-lr", type=positive_float, nargs="+", default=None, help=f"AdamW learning-rate grid (default {' '.join(map(str, ADAMW_LRS))})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"celo2 demo: {message}", file=sys.stderr)
    return 2


def _load_theta(path: str | None):
    """The theta to use, or an error message (the demo never falls back silently)."""
    import celo2

    try:
        return celo2.load_theta(path) if path else celo2.load_theta(), None
    except celo2.ThetaNotFoundError as exc:
        if path:
            return None, f"{exc}. Pass an existing theta file with --theta PATH."
        return None, (
            f"no theta to run Celo2 with: {exc}\n"
            "Pass one with --theta PATH, for example the authors' published checkpoint "
            "(celo2 demo --theta hf://amoudgl/celo2, needs huggingface_hub) or a theta.state / "
            ".npz / .pt file you hold."
        )
    except celo2.ThetaError as exc:
        return None, f"the theta file is not usable: {exc}"


def run(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        return _fail("needs PyTorch: pip install 'celo2[torch]'")
    theta, error = _load_theta(args.theta)
    if error:
        return _fail(error)
    from celo2._runlock import RunLock
    from celo2.data import DatasetNotFoundError, load_task_images

    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    hidden = args.hidden if args.hidden is not None else (32 if args.quick else 128)

    try:
        x_all, y_all = load_task_images(args.dataset, "train", root=args.data_dir)
        x_test, y_test = load_task_images(args.dataset, "test", root=args.data_dir)
    except (DatasetNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    # The output folder is claimed before training, so that a bad --out, a
    # folder in use or one holding the user's own files is reported before the
    # minute of work, not after it.
    with RunLock(args.out, flag="--out", kind="demo", adopt=is_earlier_demo_folder):
        return _train_and_report(torch, args, theta, steps, hidden, (x_all, y_all), (x_test, y_test))


def is_earlier_demo_folder(folder: Path) -> bool:
    """Whether ``folder`` (unmarked) holds a demo's output from before run folders carried a marker.

    Args:
        folder: an existing folder without a run-folder marker.

    Returns:
        True when its ``results.json`` is a demo's (``config`` and ``runs`` with the demo's settings).
    """
    try:
        results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(results, dict) and isinstance(results.get("runs"), list)
            and isinstance(results.get("config"), dict) and "celo2_lrs" in results["config"])


def _train_and_report(torch, args: argparse.Namespace, theta, steps: int, hidden: int, train_split, test_split) -> int:
    """Train every (optimizer, lr) of the grid, print the table and write the outputs into ``args.out``."""
    from tqdm.auto import tqdm

    from celo2.eval import optimizers as bench_optimizers
    from celo2.torch import Celo2

    x_all, y_all = train_split
    x_test, y_test = test_split
    celo2_lrs = tuple(args.celo2_lr or (QUICK_CELO2_LRS if args.quick else CELO2_LRS))
    adamw_lrs = tuple(args.adamw_lr or (QUICK_ADAMW_LRS if args.quick else ADAMW_LRS))
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(x_all))
    n_val = max(1, int(round(VAL_FRACTION * len(x_all))))
    val_idx, train_idx = order[:n_val], order[n_val:]
    data = {
        "train": (torch.from_numpy(x_all[train_idx]), torch.from_numpy(y_all[train_idx])),
        "val": (torch.from_numpy(x_all[val_idx]), torch.from_numpy(y_all[val_idx])),
        "test": (torch.from_numpy(x_test), torch.from_numpy(y_test)),
    }
    n_train = len(train_idx)
    # One data order for every run: whole-epoch permutations, cut into batches.
    epochs = -(-steps * args.batch_size // n_train)
    batches = np.concatenate([rng.permutation(n_train) for _ in range(epochs)])
    batches = torch.from_numpy(batches[: steps * args.batch_size].reshape(steps, args.batch_size))

    n_in, n_classes = x_all.shape[1], int(y_all.max()) + 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and timings stay comparable
    try:
        torch.manual_seed(args.seed)
        init_state = {k: v.clone() for k, v in _mlp(torch, n_in, hidden, n_classes).state_dict().items()}

        def make_model():
            model = _mlp(torch, n_in, hidden, n_classes)
            model.load_state_dict(init_state)
            return model

        grid = [("AdamW", lr) for lr in adamw_lrs] + [("Celo2", lr) for lr in celo2_lrs]
        print(
            f"celo2 demo: {args.dataset} ({n_train} train / {n_val} val / {len(x_test)} test, "
            f"{n_in} inputs), MLP {n_in}-{hidden}-{hidden}-{n_classes}, {steps} steps, batch "
            f"{args.batch_size}, warmup {bench_optimizers.WARMUP_FRACTION:.0%} + cosine, seed {args.seed}"
        )
        print(f"theta: {theta.metadata.get('source', 'given')} ({theta!r})")
        probe = Celo2(make_model().named_parameters(), lr=1e-3, theta=theta)
        print("Celo2 routing (learned rule for hidden matrices, AdamW at 20x lr for the rest):")
        print("  " + probe.routing_table().replace("\n", "\n  "))

        results = []
        with tqdm(total=steps * len(grid), desc="training", unit="step", disable=args.no_progress, file=sys.stderr, mininterval=0.5) as bar:
            for name, lr in grid:
                model = make_model()
                if name == "Celo2":
                    opt = Celo2(model.named_parameters(), lr=lr, weight_decay=args.weight_decay, theta=theta)
                else:
                    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
                bar.set_description(f"{name} lr={lr:g}")
                results.append(_train(torch, model, opt, steps, batches, data, bar, RunResult(name, lr)))
    finally:
        torch.set_num_threads(threads)

    for name in ("AdamW", "Celo2"):
        runs = [r for r in results if r.optimizer == name]
        best = min(runs, key=lambda r: r.val_loss if math.isfinite(r.val_loss) else math.inf)
        best.best = True

    out = Path(args.out)
    table = format_table(results)
    print()
    print(table)
    config = {
        "dataset": args.dataset, "steps": steps, "seed": args.seed, "hidden": hidden,
        "batch_size": args.batch_size, "weight_decay": args.weight_decay,
        "celo2_lrs": list(celo2_lrs), "adamw_lrs": list(adamw_lrs), "theta": theta.metadata.get("source"),
        "theta_sha256": theta.checksum(),
    }
    png = out / "loss_curves.png"
    # The three outputs are staged together: a full disk leaves the previous ones as they were.
    atomic_write_group([
        (out / "table.txt", (table + "\n").encode()),
        (out / "results.json",
         json.dumps({"config": config, "runs": [asdict(r) for r in results]}, indent=1, allow_nan=True).encode()),
        (png, plot_curves(results, f"{args.dataset}, {steps} steps, seed {args.seed}")),
    ])
    print(f"\nwrote {png}, {out / 'results.json'} and {out / 'table.txt'}")
    return 0


def _mlp(torch, n_in: int, hidden: int, n_classes: int):
    """The bench's MLP with two ReLU hidden layers; its output layer is named ``head``, so Celo2 routes it to AdamW."""
    from celo2.eval.tasks import MLP

    return MLP([n_in, hidden, hidden, n_classes])


def _evaluate(torch, model, x, y) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc


def _train(torch, model, opt, steps, batches, data, bar, result: RunResult) -> RunResult:
    """Trains in place and fills ``result``; a run whose loss turns non-finite stops there."""
    from celo2.eval.optimizers import warmup_cosine  # the bench's schedule

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    x_train, y_train = data["train"]
    eval_every = max(1, steps // 20)
    result.initial_train_loss = _evaluate(torch, model, x_train, y_train)[0]
    start = time.perf_counter()
    for step in range(steps):
        idx = batches[step]
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = loss.item()
        result.train_curve.append(value)
        bar.update(1)
        if not math.isfinite(value):
            result.diverged = True
            bar.update(steps - step - 1)
            break
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            result.val_steps.append(step + 1)
            result.val_curve.append(_evaluate(torch, model, *data["val"])[0])
            bar.set_postfix(loss=f"{value:.3f}", val=f"{result.val_curve[-1]:.3f}", refresh=False)
    result.wall_s = time.perf_counter() - start
    if not result.diverged:
        result.final_train_loss = _evaluate(torch, model, x_train, y_train)[0]
        result.val_loss = result.val_curve[-1]
        result.test_loss, result.test_acc = _evaluate(torch, model, *data["test"])
    return result


def format_table(results: list[RunResult]) -> str:
    """Plain-text comparison table; ``*`` marks each optimizer's learning rate chosen by validation loss."""
    header = ("optimizer", "lr", "train loss", "val loss", "test loss", "test acc", "time (s)")
    rows = []
    for r in results:
        if r.diverged:
            cells = ("diverged",) * 4
        else:
            cells = (f"{r.final_train_loss:.4f}", f"{r.val_loss:.4f}", f"{r.test_loss:.4f}", f"{r.test_acc:.2%}")
        rows.append((("* " if r.best else "  ") + r.optimizer, f"{r.lr:g}", *cells, f"{r.wall_s:.1f}"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)]
    best = {r.optimizer: r for r in results if r.best}
    lines.append("")
    lines.append("* = learning rate chosen by validation loss; train loss is on the whole training split after the last step.")
    if "Celo2" in best and "AdamW" in best and not (best["Celo2"].diverged or best["AdamW"].diverged):
        c, a = best["Celo2"], best["AdamW"]
        lines.append(
            f"best Celo2 (lr {c.lr:g}): val loss {c.val_loss:.4f}, test acc {c.test_acc:.2%}, {1000 * c.wall_s / len(c.train_curve):.1f} ms/step | "
            f"best AdamW (lr {a.lr:g}): val loss {a.val_loss:.4f}, test acc {a.test_acc:.2%}, {1000 * a.wall_s / len(a.train_curve):.1f} ms/step"
        )
    return "\n".join(lines)


def _smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average (batch losses are noisy)."""
    v = np.asarray(values, np.float64)
    if window <= 1 or len(v) < 2:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(len(v)):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plot_curves(results: list[RunResult], title: str) -> bytes:
    """Training and validation loss of every run (the chosen learning rates bold): the PNG's bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)  # no pyplot: no global backend state touched
    ax_train, ax_val = fig.subplots(1, 2)
    colours = {"AdamW": "tab:blue", "Celo2": "tab:red"}
    for r in results:
        style: dict[str, Any] = dict(color=colours.get(r.optimizer, "k"), lw=2.0 if r.best else 0.8, alpha=1.0 if r.best else 0.35)
        label = f"{r.optimizer} lr={r.lr:g}" + (" (best)" if r.best else "")
        window = max(1, len(r.train_curve) // 50)
        steps = np.arange(1, len(r.train_curve) + 1)
        ax_train.plot(steps, _smooth(r.train_curve, window), label=label, **style)
        if r.val_curve:
            ax_val.plot(r.val_steps, r.val_curve, label=label, **style)
    for ax, name in ((ax_train, "training loss (batch, smoothed)"), (ax_val, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_val.legend(fontsize=7)
    fig.suptitle(f"Celo2 vs AdamW: {title}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
