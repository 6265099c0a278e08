from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from search import services


class Command(BaseCommand):
    help = "Find the images most similar to FILE with the active model version."

    def add_arguments(self, parser):
        parser.add_argument("file")
        parser.add_argument("-k", type=int, default=10)
        parser.add_argument("--dataset", default=None)
        parser.add_argument("--json", action="store_true", help="print the API's JSON")

    def handle(self, *args, **options):
        path = Path(options["file"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            result = services.search_by_upload(data, k=options["k"], dataset=options["dataset"],
                                               remember=False)  # no one to mark it: keep nothing
        except services.SearchError as exc:
            raise CommandError(str(exc)) from None
        if options["json"]:
            self.stdout.write(json.dumps(result.as_dict(), indent=2))
            return
        self.stdout.write(f"model {result.model.name}, top {result.k}:")
        for rank, hit in enumerate(result.hits, start=1):
            self.stdout.write(f"{rank:3d}. {hit.score:.4f}  #{hit.image_id:<6} {hit.label or '(no label)':<24} "
                              f"{hit.dataset}  {hit.file}")
