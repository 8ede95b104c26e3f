"""Model sources on the Hugging Face Hub: a repo id (``owner/name``) resolved to its snapshot in the local Hub
cache (``HF_HUB_CACHE``), read offline first and downloaded by ``huggingface_hub`` where the network allows.

Only the files a causal LM needs are fetched: config, tokenizer, generation config and the safetensors weights
(with their index when sharded); never pickled ``.bin`` weights.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import LowbitError

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]  # configs, index, tokenizer, weights, merges


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hub repo id (``owner/name``)."""
    return REPO_ID.fullmatch(text) is not None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host (``HF_ENDPOINT``) accepts a connection: without a network, ``huggingface_hub`` and
    ``datasets`` would spend half a minute retrying before failing the same way."""
    import huggingface_hub.constants as hub

    url = urlparse(hub.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of ``repo_id``'s snapshot: from the Hub cache, else downloaded (where the network allows
    and ``HF_HUB_OFFLINE`` is not set); a clear error when neither works."""
    import huggingface_hub.constants as hub
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=FILES, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and relatives)
        log.debug("%s is not in the Hub cache (%s)", repo_id, e)
    if hub.HF_HUB_OFFLINE or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if hub.HF_HUB_OFFLINE else "the Hugging Face Hub is not reachable"
        raise LowbitError(f"model {repo_id!r} is not in the Hugging Face cache ({hub.HF_HUB_CACHE}) and {why}; "
                          "download it where the network allows, or pass a local folder or .gguf file")
    log.info("downloading %s from the Hugging Face Hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=FILES))
    except Exception as e:  # noqa: BLE001 - repository not found, gated, network errors: huggingface_hub's types
        text = str(e).strip().splitlines()
        raise LowbitError(f"model {repo_id!r} could not be downloaded from the Hugging Face Hub "
                          f"({type(e).__name__}: {text[0] if text else ''}); check the id and your access") from e
