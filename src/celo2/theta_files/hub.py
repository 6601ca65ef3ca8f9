"""``hf://owner/repo[/path/in/repo][@revision]``: a theta file on the Hugging Face Hub.

The URL is checked offline first (:func:`parse_hub_url`); :func:`download_from_hub`
then asks the Hub once, with a short timeout and no retries, and falls back to
the local Hugging Face cache when the Hub does not answer, so an offline machine
fails at once with a message that says how to get the file. ``huggingface_hub``
is imported only here, on the first download (and in :mod:`celo2.theta_files.push`, on a push).
"""

from __future__ import annotations

import re

from celo2.rule.theta import ThetaError

#: Seconds ``hf://`` waits for the Hub to answer before it falls back to the local cache.
TIMEOUT_S = 5.0
#: The file an ``hf://`` URL names when it gives only the repository (also looked for in a folder).
DEFAULT_FILENAME = "theta.state"
#: What a URL for the Hub starts with.
SCHEME = "hf://"

#: One part (owner or name) of a Hub repository id: letters, digits, '-', '_', '.'; no '-' or '.' at
#: either end; at most 96 characters in all.
_HUB_ID_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")


def parse_hub_url(url: str) -> tuple[str, str, str | None]:
    """``hf://owner/repo[/path/in/repo][@revision]`` -> ``(repo_id, filename, revision)``, checked offline.

    Args:
        url: The URL, starting with ``hf://``.

    Returns:
        The repository id ``owner/repo``, the file in it (:data:`DEFAULT_FILENAME` when the
        URL names none) and the revision (``None`` for the default branch).

    Raises:
        ThetaError: the URL is malformed, the repository id is not a valid Hub id, or the
            revision after ``@`` is empty; the message names the part that is wrong.
    """
    usage = "expected hf://owner/repo[/file][@revision]"
    rest = url[len(SCHEME):]
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        if not revision.strip():
            raise ThetaError(f"{url}: the revision after '@' is empty; {usage} (a branch, tag or commit), "
                             "or leave out '@' for the default branch")
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2:
        raise ThetaError(f"{url}: {usage}")
    repo_id = "/".join(parts[:2])
    bad = next((p for p in parts[:2] if not _HUB_ID_PART.match(p) or "--" in p or ".." in p), None)
    if bad is not None or len(repo_id) > 96 or repo_id.endswith(".git"):
        why = f"{bad!r} is not a valid owner or repository name" if bad is not None else "too long or ends in .git"
        raise ThetaError(
            f"{url}: {repo_id!r} is not a valid Hugging Face repository id ({why}: letters, digits, '-', '_' and "
            "'.', not starting or ending with '-' or '.', no '--' or '..', at most 96 characters); "
            f"{usage}")
    filename = "/".join(parts[2:]) or DEFAULT_FILENAME
    return repo_id, filename, revision


def download_from_hub(url: str) -> str:
    """Fetch ``hf://owner/repo[/path/in/repo][@revision]`` with huggingface_hub; the local path of the file.

    One metadata request with a timeout of :data:`TIMEOUT_S` seconds and no retries
    tells whether the Hub answers; when it does not (or ``HF_HUB_OFFLINE`` is set) only
    the local Hugging Face cache is read, so an offline machine fails at once instead
    of in huggingface_hub's retry loop.

    Args:
        url: The URL, starting with ``hf://``.

    Returns:
        The path of the file in the local Hugging Face cache.

    Raises:
        ThetaError: Malformed URL, huggingface_hub missing, the Hub answers with an error
            (no such repository, file or revision), or no network and the file is not cached.
            The message says how to get the file.
    """
    repo_id, filename, revision = parse_hub_url(url)
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as exc:
        raise ThetaError(
            f"{url}: downloading from the Hugging Face Hub needs 'pip install huggingface_hub'"
        ) from exc
    how = (
        f"download {filename} from https://huggingface.co/{repo_id} on a machine with network access and pass "
        "its local path, or point HF_HOME at a Hugging Face cache that holds it"
    )
    request = {"repo_id": repo_id, "filename": filename, "revision": revision}
    offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
    if offline:
        try:
            return huggingface_hub.hf_hub_download(**request, local_files_only=True)
        except Exception as exc:
            raise ThetaError(
                f"{url}: HF_HUB_OFFLINE is set and {filename} of {repo_id} is not in the local cache; {how}"
            ) from exc
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(**request), timeout=TIMEOUT_S)
    except HfHubHTTPError as exc:
        answer = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ThetaError(f"{url}: the Hub at {constants.ENDPOINT} answered: {answer:.300}") from exc
    except Exception as exc:  # no answer: connection refused, DNS failure, timeout
        try:
            return huggingface_hub.hf_hub_download(**request, local_files_only=True)
        except Exception:
            raise ThetaError(
                f"{url}: cannot reach {constants.ENDPOINT} ({type(exc).__name__}, timeout {TIMEOUT_S:g} s) "
                f"and {filename} of {repo_id} is not in the local cache; {how}"
            ) from exc
    try:
        return huggingface_hub.hf_hub_download(**request, etag_timeout=TIMEOUT_S)
    except Exception as exc:
        raise ThetaError(f"{url}: download failed ({type(exc).__name__}: {exc!s:.200}); {how}") from exc


