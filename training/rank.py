"""Entry point of ranks 1..N-1 of a distributed training run (training/distributed.py):

    python -m training.rank SPEC_FILE RANK

Sets up Django (the training modules import the models), then runs the rank's
training loop with the settings and rows rank 0 wrote to SPEC_FILE."""

from __future__ import annotations

import os
import sys


def main(spec_path: str, rank: int) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cbirsite.settings")
    import django

    django.setup()
    from training.distributed import run_rank
    from training.trainer import _train

    return run_rank(spec_path, rank, _train)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
