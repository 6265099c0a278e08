"""Entry point of ranks 1..N-1 of a distributed training run (training/core/distributed.py):

    python -m training.core.rank SPEC_FILE RANK

Runs the rank's training loop with the settings and rows rank 0 wrote to
SPEC_FILE. No Django: the ML core never touches the database."""

from __future__ import annotations

import sys


def main(spec_path: str, rank: int) -> int:
    from training.core.allocator import apply_in_process
    from training.core.distributed import run_rank
    from training.core.trainer import _train

    apply_in_process()  # as rank 0 has it (training/core/allocator.py)
    return run_rank(spec_path, rank, _train)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
