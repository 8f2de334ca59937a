"""Names from ``scripts/`` the tests use (the support table, the pooled selection baseline)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from pooled_baseline import dense_rows, select_top_blocks  # noqa: E402, F401
from support_table import KernelSupport, support_table  # noqa: E402, F401
