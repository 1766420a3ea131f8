"""Whether a ``--model`` can be loaded, decided before anything waits for the Hugging Face Hub.

A name that is neither a local folder, a ``.gguf`` file nor a packaged model comes from the Hub. When the Hub is
unreachable (no network, or ``HF_HUB_OFFLINE=1``), transformers retries for about a minute before its error; here a
one-second connection test decides, the Hub is switched off for the rest of the command (``HF_HUB_OFFLINE=1``, so
models in the local cache load without waiting), and a model that is not in the cache is one error line naming what
is accepted offline.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

OFFLINE_ENV = "HF_HUB_OFFLINE"
_TRUE = ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 1.0) -> bool:
    """Whether a TCP connection to the Hub (``$HF_ENDPOINT``, default huggingface.co) opens within ``timeout``."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def packaged_models() -> tuple[str, ...]:
    """The model names structlora resolves without a folder or the Hub (``train nlg``/``train llm``)."""
    from structlora.tasks.nlg.modeling import MODEL_ALIASES

    return tuple(MODEL_ALIASES)


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.lower() in packaged_models()


def _in_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


def check_model_available(name: str | None, flag: str = "--model") -> None:
    """Return at once when model ``name`` can be loaded (local, packaged, or the Hub reachable); with the Hub
    unreachable, switch it off for this command and refuse a model that is not in the local cache."""
    if not name or _is_local(name):
        return
    switched_off = os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE
    if not switched_off and hub_reachable():
        return
    os.environ[OFFLINE_ENV] = "1"  # nothing waits for the Hub from now on (read by huggingface_hub when imported)
    if _in_cache(name):
        return
    why = f"{OFFLINE_ENV}=1 is set" if switched_off else "the Hugging Face Hub is unreachable"
    raise SystemExit(f"error: cannot load {flag} {name!r}: it is not a local folder nor in the Hugging Face cache, "
                     f"and {why}. Offline, {flag} takes a local folder (config.json + weights), a .gguf file, a model "
                     f"already in the cache, or (train nlg / train llm) the packaged "
                     f"{', '.join(packaged_models())}")
