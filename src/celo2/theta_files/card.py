"""The model card (``README.md``) that goes with a theta pushed to the Hugging Face Hub.

:func:`model_card` writes what a researcher needs to use and judge a shared
theta: how to load it, its checksum, the rule variant it belongs to, the
meta-training recipe (configuration, iterations, inner steps, wall time, the
commit it ran from: a run folder's ``metadata.json``) and the benchmark
tables of a ``celo2 bench`` report, when given. Everything is read from local
files; nothing here touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from celo2.rule.theta import Theta, ThetaError
from celo2.theta_files.formats import json_object

#: The run folder's record of a finished meta-training run (written by ``celo2 meta-train``).
RUN_METADATA = "metadata.json"
#: The report a ``celo2 bench`` run folder holds.
BENCH_REPORT = "report.md"
#: Largest metadata or report file read for a card.
_MAX_TEXT_BYTES = 1 << 20


def read_run_metadata(run_dir: "str | Path") -> dict[str, Any]:
    """The ``metadata.json`` of a meta-training run folder.

    Args:
        run_dir: The run folder (or its ``metadata.json``).

    Returns:
        The record (config, iterations, inner steps, wall time, final meta-loss, git commit).

    Raises:
        ThetaError: No such file, unreadable, too large, or not a JSON object; the message names the file.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / RUN_METADATA
    return json_object(_read_text(path, "run metadata"), path, "run metadata")


def read_bench_tables(report: "str | Path") -> str:
    """The Markdown tables of a ``celo2 bench`` report, with the line before each (its caption).

    Args:
        report: ``report.md`` (or any Markdown file with tables, e.g. a compare suite's ``table.md``),
            or a bench run folder holding ``report.md``.

    Returns:
        The tables, separated by blank lines.

    Raises:
        ThetaError: No such file, unreadable, too large, or no table in it; the message names the file.
    """
    path = Path(report)
    if path.is_dir():
        path = path / BENCH_REPORT
    lines = _read_text(path, "bench report").splitlines()
    blocks: list[list[str]] = []
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            continue
        if i == 0 or not lines[i - 1].lstrip().startswith("|"):
            caption = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            blocks.append([caption, ""] if caption and not caption.lstrip().startswith("|") else [])
        blocks[-1].append(line)
    if not blocks:
        raise ThetaError(f"{path}: no Markdown table in this bench report")
    return "\n\n".join("\n".join(block) for block in blocks)


def _read_text(path: Path, what: str) -> str:
    try:
        if not path.is_file():
            raise ThetaError(f"{path}: no such {what} file")
        if path.stat().st_size > _MAX_TEXT_BYTES:
            raise ThetaError(f"{path}: {path.stat().st_size} bytes, more than a {what} holds")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ThetaError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ThetaError(f"{path}: the {what} is not UTF-8 text ({exc.reason})") from None


def model_card(theta: Theta, repo_id: str, filename: str, *, run_metadata: Mapping[str, Any] | None = None,
               bench_tables: str | None = None) -> str:
    """The ``README.md`` of a Hub repository holding one theta.

    Args:
        theta: The theta pushed.
        repo_id: The repository, ``owner/name``.
        filename: The theta's file name in the repository.
        run_metadata: The meta-training run's ``metadata.json`` record (default: no recipe section
            beyond what the theta's own metadata says).
        bench_tables: Markdown tables of a bench report (default: no benchmark section).

    Returns:
        The card's Markdown text, with a YAML header the Hub reads (library, tags).
    """
    variant = theta.variant
    url = f"hf://{repo_id}" + ("" if filename == "theta.state" else f"/{filename}")
    lines = [
        "---",
        "library_name: celo2",
        "tags:",
        "- learned-optimizer",
        "- celo2",
        "- meta-learning",
        "---",
        "",
        f"# {repo_id.split('/')[-1]}: a Celo2 theta",
        "",
        "The weights (theta) of the Celo2 learned optimizer's update rule (arXiv 2602.19142), "
        "shared with the celo2 library (`pip install celo2`).",
        "",
        f"- file: `{filename}`",
        f"- parameters: {theta.num_params}",
        f"- checksum (celo2's `Theta.checksum()`): `{theta.checksum()}`",
        f"- rule: {'the published Celo2 architecture' if variant.is_published else 'rule variant ' + variant.label}",
        "",
        "## Use",
        "",
    ]
    if variant.is_published:
        lines += [
            "```python",
            "import celo2",
            f'theta = celo2.load_theta("{url}")',
            "optimizer = celo2.torch.Celo2(model.parameters(), lr=1e-3, theta=theta)",
            "```",
        ]
    else:
        lines += [
            "This theta belongs to a rule variant other than the published one. celo2 runs it on the "
            "reference and chunked PyTorch backends and on celo2.optax's XLA path (the fast kernels run "
            "the published rule only):",
            "",
            "```python",
            "import celo2",
            f'theta = celo2.load_theta("{url}")',
            "optimizer = celo2.torch.Celo2(model.parameters(), lr=1e-3, theta=theta)  # backend auto: chunked",
            "```",
        ]
    lines += ["", "## Rule variant", ""]
    if variant.is_published:
        lines.append("The published architecture (MLP 30 -> 8 -> 8 -> 3, every feature group, RMS decay 0.95, "
                     "per-step RMS output normalisation, the direction output only).")
    else:
        lines += ["| field | this theta | published |", "| --- | --- | --- |"]
        lines += [f"| {d.split('=', 1)[0]} | {d.split('=', 1)[1].split(' (published ')[0]} | "
                  f"{d.split(' (published ')[1].rstrip(')')} |" for d in variant.differences()]
    fields_json = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in variant.to_dict().items())
    lines += ["", "```json", "{\n" + fields_json + "\n}", "```", "", "## Recipe", ""]
    record = dict(run_metadata or {})
    config = record.get("config", theta.metadata.get("config"))
    iterations = record.get("iterations", theta.metadata.get("iterations"))
    if config is None and iterations is None:
        lines.append("Not recorded (push with `--run RUN_DIR` to include the meta-training run's configuration).")
    else:
        facts = [("outer iterations", iterations), ("inner steps", record.get("inner_steps")),
                 ("wall time (s)", record.get("wall_time_s")), ("final meta-loss", record.get("final_meta_loss")),
                 ("devices", record.get("devices")), ("platform", record.get("platform")),
                 ("celo2 commit", record.get("git_commit"))]
        if isinstance(config, Mapping):
            facts = [("preset", config.get("preset")), ("task families", ", ".join(map(str, config.get("tasks", []))))
                     ] + facts
        lines += [f"- {name}: {value:.1f}" if isinstance(value, float) else f"- {name}: {value}"
                  for name, value in facts if value not in (None, "")]
        if isinstance(config, Mapping):
            lines += ["", "Meta-training configuration (`celo2 meta-train`, its `config.json`):", "",
                      "```json", json.dumps(config, indent=2, sort_keys=True), "```"]
    if bench_tables:
        lines += ["", "## Benchmark", "", "From `celo2 bench` (final validation loss; lower is better):", "",
                  bench_tables]
    return "\n".join(lines) + "\n"


__all__ = ["BENCH_REPORT", "RUN_METADATA", "model_card", "read_bench_tables", "read_run_metadata"]
