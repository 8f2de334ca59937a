"""Regenerate the generated docs (same as ``python -m attnbridge docs``; ``--check`` only reports)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnbridge.docs_gen import docs_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(docs_main(ROOT, check="--check" in sys.argv[1:]))
