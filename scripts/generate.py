"""Run a whole pipeline with an attnbridge backend: ``attnbridge generate`` as a script.

One process::

    python scripts/generate.py --model wan-tiny --backend sdpa

Several (every rank runs the pipeline on its share of the sequence, rank 0 writes the files)::

    accelerate launch --num_processes 2 scripts/generate.py --model PATH --backend fa \\
        --option ulysses_degree=2
    torchrun --nproc_per_node 2 scripts/generate.py --model wan-tiny --option ulysses_degree=2

Arguments are those of ``attnbridge generate --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnbridge.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
