"""Whether the Hugging Face Hub can be reached, said at once in one line (with the embedded dataset a near-miss meant)."""

from __future__ import annotations

import difflib
import socket

import datasets

_HUB_TIMEOUT_S = 5  # seconds to wait for a TCP connection to the Hub before giving up


def check_hub_reachable(dataset_name: str) -> None:
    """FileNotFoundError in one line, at once, when the Hub is needed but cannot be reached.

    Without it, `datasets` retries for about 30 s and logs raw connection errors. Offline mode is left to `datasets`,
    which then reads its local cache only (and fails at once when the dataset is not there).
    """
    if datasets.config.HF_HUB_OFFLINE:
        return
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=_HUB_TIMEOUT_S).close()
    except OSError as err:
        from trl_kto_ext.models import TINY_DATASET

        close = difflib.get_close_matches(str(dataset_name).lower(), [TINY_DATASET], n=1, cutoff=0.75)
        hint = f" Did you mean `{close[0]}` (the embedded dataset)?" if close else ""
        raise FileNotFoundError(
            f"{dataset_name!r} is not a local path, and the Hub ({constants.ENDPOINT}) cannot be reached "
            f"({err.strerror or err}).{hint} Check the spelling of a local path, your network, or set HF_HUB_OFFLINE=1 to "
            "load a dataset from the local Hub cache."
        ) from None
