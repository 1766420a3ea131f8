"""Where the tests find the real data and tokenizer files: `$STRUCTLORA_DATA` (data) and
`$STRUCTLORA_SHARED` (the whole folder), else `shared/` beside the repository, as on CI."""

from __future__ import annotations

import os
from pathlib import Path

SHARED = Path(os.environ.get("STRUCTLORA_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
SHARED_DATA = Path(os.environ.get("STRUCTLORA_DATA", SHARED / "data"))
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer"
