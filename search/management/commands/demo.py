from __future__ import annotations

from pathlib import Path

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = ("Set up the demo: import a folder of labelled images (labels from sub-folder names) and index it "
            "with the default pretrained model. Safe to run again: it only adds what is missing.")

    def add_arguments(self, parser):
        parser.add_argument("--path", default="/usr/share/tuxpaint/stamps/animals")
        parser.add_argument("--dataset", default="animals")
        parser.add_argument("--model", default=None)

    def handle(self, *args, **options):
        path = Path(options["path"])
        if not path.is_dir():
            raise CommandError(f"{path} is not a folder (on Debian: apt-get install tuxpaint-stamps-default)")
        call_command("import_images", str(path), dataset=options["dataset"], labels_from_folders=True,
                     description=f"Demo images from {path}", stdout=self.stdout)
        build_options = {"dataset": options["dataset"], "stdout": self.stdout}
        if options["model"]:
            build_options["model"] = options["model"]
        call_command("build_index", **build_options)
