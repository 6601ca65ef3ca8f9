"""``celo2 theta push``: a theta file and its model card, uploaded to a Hugging Face Hub repository.

:func:`push_theta` reads and checks everything local first (the theta, the run's
metadata, the bench report, the repository id), then creates the repository
(and branch) if missing and uploads the theta's bytes as they are plus the
``README.md`` of :func:`celo2.theta_files.card.model_card` in one commit with
``huggingface_hub`` (an optional dependency). Local files are only read.
"""

from __future__ import annotations

import os
from pathlib import Path

from celo2.rule.theta import ThetaError
from celo2.theta_files import ThetaNotFoundError, load_theta
from celo2.theta_files.card import RUN_METADATA, model_card, read_bench_tables, read_run_metadata
from celo2.theta_files.formats import read_theta_bytes
from celo2.theta_files.hub import DEFAULT_FILENAME, SCHEME, parse_hub_url


class HubPushError(RuntimeError):
    """Pushing a theta to the Hub failed (no huggingface_hub, refused credentials, no network, an error
    answer); the message says which and what to do. The local files are never changed."""


#: The model card's name in the repository.
CARD_FILENAME = "README.md"


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid Hub repository id ``owner/name``, checked offline.

    Args:
        repo_id: The id as given.

    Returns:
        The id.

    Raises:
        ThetaError: It is not ``owner/name`` with valid parts (the message says what is wrong).
    """
    if repo_id.count("/") != 1:
        raise ThetaError(f"{repo_id!r}: expected a Hub repository id owner/name (e.g. me/celo2-theta)")
    parsed, _, _ = parse_hub_url(SCHEME + repo_id)
    return parsed


def push_theta(theta_path: "str | os.PathLike[str]", repo_id: str, *, revision: str | None = None,
               private: bool = False, token: str | None = None, endpoint: str | None = None,
               run_dir: "str | os.PathLike[str] | None" = None,
               bench_report: "str | os.PathLike[str] | None" = None) -> str:
    """Upload a theta file and its generated model card to a Hugging Face Hub repository.

    Everything local is read and checked first (the theta loads, the run metadata and the
    bench report parse, the repository id is valid), then the repository is created if
    missing, the branch too when ``revision`` names one, and the theta file (its bytes as
    they are) and ``README.md`` (:func:`celo2.theta_files.card.model_card`) go up in one
    commit. The local files are only read.

    Args:
        theta_path: A theta file, or a meta-training run folder (its ``theta.state``; its
            ``metadata.json`` then gives the recipe unless ``run_dir`` is given).
        repo_id: The repository, ``owner/name``.
        revision: The branch to commit to (default the repository's default branch); created if missing.
        private: Create the repository private (an existing one keeps its visibility).
        token: A Hub token with write access (default: huggingface_hub's, from ``HF_TOKEN`` or ``hf auth login``).
        endpoint: The Hub's URL (default ``https://huggingface.co`` or ``HF_ENDPOINT``).
        run_dir: The meta-training run folder whose ``metadata.json`` goes into the card's recipe.
        bench_report: A ``celo2 bench`` report (``report.md``, or its run folder) whose tables go into the card.

    Returns:
        The URL of the commit.

    Raises:
        ThetaNotFoundError: No theta at ``theta_path``.
        ThetaError: The theta, run metadata or report is malformed, or ``repo_id`` is invalid.
        HubPushError: huggingface_hub is missing, the Hub refuses the credentials or answers with an
            error, or cannot be reached; the message names the endpoint and what to do.
    """
    repo_id = check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise ThetaError("--revision: empty; give a branch name, or leave it out for the default branch")
    path = Path(theta_path).expanduser()
    if path.is_dir():
        if run_dir is None and (path / RUN_METADATA).is_file():
            run_dir = path
        path = path / DEFAULT_FILENAME
    if not path.exists():
        raise ThetaNotFoundError(f"theta file not found: {path}")
    data = read_theta_bytes(path)
    theta = load_theta(path)
    metadata = read_run_metadata(run_dir) if run_dir is not None else None
    tables = read_bench_tables(bench_report) if bench_report is not None else None
    card = model_card(theta, repo_id, path.name, run_metadata=metadata, bench_tables=tables)
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as exc:
        raise HubPushError("pushing to the Hugging Face Hub needs 'pip install huggingface_hub' "
                           "(or 'pip install celo2[hub]')") from exc
    api = HfApi(endpoint=endpoint, token=token)
    where = api.endpoint
    operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=data),
                  CommitOperationAdd(path_in_repo=CARD_FILENAME, path_or_fileobj=card.encode("utf-8"))]
    step = "create the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "commit the files"
        info = api.create_commit(repo_id, operations, revision=revision,
                                 commit_message=f"celo2 theta push: {path.name} (sha256:{theta.checksum()})")
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        answer = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if status in (401, 403):
            raise HubPushError(
                f"{where} refused the credentials to {step} of {repo_id} (HTTP {status}): pass a token with write "
                "access (--token or HF_TOKEN; create one at https://huggingface.co/settings/tokens) or run "
                f"'hf auth login'; {path} is unchanged") from exc
        raise HubPushError(f"{where} answered while trying to {step} of {repo_id}: {answer:.300}; "
                           f"{path} is unchanged") from exc
    except Exception as exc:  # no answer: connection refused, DNS failure, timeout, offline mode
        raise HubPushError(f"cannot reach {where} to {step} of {repo_id} ({type(exc).__name__}: {exc!s:.200}); "
                           f"check the network (or --endpoint) and push again; {path} is unchanged") from exc
    return str(info.commit_url)


__all__ = ["CARD_FILENAME", "HubPushError", "check_repo_id", "push_theta"]
