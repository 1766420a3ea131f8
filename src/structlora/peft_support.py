"""Which PEFT releases structlora plugs into, and the one error outside them.

structlora's methods are PEFT methods written into PEFT's module-level tables (`structlora.peft_method`), which
PEFT does not promise to keep stable: only the releases tested in CI are accepted.
"""

from __future__ import annotations

import re
from importlib import metadata

# The PEFT releases CI tests (oldest and newest); pyproject.toml bounds peft to the same range.
SUPPORTED_PEFT = (">=0.21", "<0.23")
_LOWEST, _BELOW = (0, 21), (0, 23)


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def require_supported_peft() -> str:
    """The installed peft version, or ImportError naming the supported range (peft missing or outside it)."""
    wanted = f"peft{','.join(SUPPORTED_PEFT)}"
    try:
        version = metadata.version("peft")
    except metadata.PackageNotFoundError:
        raise ImportError(f"structlora needs {wanted}, which is not installed: pip install '{wanted}'") from None
    release = _major_minor(version)
    if release is None or not _LOWEST <= release < _BELOW:
        raise ImportError(f"structlora needs {wanted} (the PEFT releases it is tested with), but peft {version} is "
                          f"installed: pip install '{wanted}'")
    return version
