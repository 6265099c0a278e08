from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from search.ingest import import_folder
from search.management.progress import progress_bar
from search.models import Dataset


class Command(BaseCommand):
    help = ("Import every image below a folder into a dataset (created if needed). Images are recognised by "
            "content; exact duplicates are skipped; unreadable files are reported and never abort the import.")

    def add_arguments(self, parser):
        parser.add_argument("path", help="a folder of images")
        parser.add_argument("--dataset", required=True, help="dataset name (created if it does not exist)")
        parser.add_argument("--labels-from-folders", action="store_true",
                            help="label each image with its sub-folder path relative to PATH (e.g. mammals/cats)")
        parser.add_argument("--label-depth", type=int, default=None,
                            help="with --labels-from-folders: keep only the first N folder levels")
        parser.add_argument("--description", default="", help="description for a new dataset")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **options):
        path = Path(options["path"])
        if not path.exists():
            raise CommandError(f"{path} does not exist")
        if path.is_file():
            raise CommandError(f"{path} is a file; give a folder of images")
        dataset, created = Dataset.objects.get_or_create(name=options["dataset"],
                                                         defaults={"description": options["description"]})
        if created:
            self.stdout.write(f"created dataset {dataset.name!r}")
        with progress_bar(f"importing into {dataset.name}", disable=options["no_progress"]) as progress:
            report = import_folder(path, dataset, labels_from_folders=options["labels_from_folders"],
                                   label_depth=options["label_depth"], progress=progress)
        not_images = [name for name, reason in report.rejected if reason == "not an image"]
        for name, reason in report.rejected:
            if reason != "not an image":
                self.stdout.write(f"  skipped {name}: {reason}")
        if not_images:
            shown = ", ".join(not_images[:5]) + (" …" if len(not_images) > 5 else "")
            self.stdout.write(f"  skipped {len(not_images)} file(s) that are not images ({shown})")
        self.stdout.write(self.style.SUCCESS(report.summary()))
