from __future__ import annotations

import shutil
import uuid
import zipfile
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from search import import_jobs, jobs
from search.ingest import StorageError, ZipRejected, import_folder, import_zip
from search.management.progress import progress_bar, wait_for_job
from search.models import Dataset, DatasetNameError, normalise_dataset_name


class Command(BaseCommand):
    help = ("Import every image below a folder, or in a zip, into a dataset (created if needed). Images are "
            "recognised by content; exact duplicates are skipped; unreadable files are reported and never abort "
            "the import. A zip is imported as a job on a worker (or --in-process).")

    def add_arguments(self, parser):
        parser.add_argument("path", help="a folder of images, or a .zip")
        parser.add_argument("--dataset", required=True, help="dataset name (created if it does not exist)")
        parser.add_argument("--labels-from-folders", action="store_true",
                            help="label each image with its sub-folder path relative to PATH (e.g. mammals/cats)")
        parser.add_argument("--label-depth", type=int, default=None,
                            help="with --labels-from-folders: keep only the first N folder levels")
        parser.add_argument("--description", default="", help="description for a new dataset")
        parser.add_argument("--no-progress", action="store_true")
        parser.add_argument("--in-process", action="store_true", help="zip: import here instead of as a job")
        parser.add_argument("--no-wait", action="store_true", help="zip: start the job and return")

    def handle(self, *args, **options):
        try:
            options["dataset"] = normalise_dataset_name(options["dataset"])
        except DatasetNameError as exc:
            raise CommandError(str(exc)) from None
        path = Path(options["path"])
        if not path.exists():
            raise CommandError(f"{path} does not exist")
        is_zip = path.is_file() and zipfile.is_zipfile(path)
        if path.is_file() and not is_zip:
            raise CommandError(f"{path} is a file but not a zip; give a folder of images or a .zip")
        dataset, created = Dataset.objects.get_or_create(name=options["dataset"],
                                                         defaults={"description": options["description"]})
        if is_zip and not options["in_process"]:
            # The job needs the dataset row before it starts; it stays even when nothing gets imported.
            if created:
                self.stdout.write(f"created dataset {dataset.name!r}")
            return self._zip_job(path, dataset, options, created=created)
        try:
            with progress_bar(f"importing into {dataset.name}", disable=options["no_progress"]) as progress:
                if is_zip:
                    report = import_zip(path, dataset, labels_from_folders=options["labels_from_folders"],
                                        progress=progress)
                else:
                    report = import_folder(path, dataset, labels_from_folders=options["labels_from_folders"],
                                           label_depth=options["label_depth"], progress=progress)
        except ZipRejected as exc:
            self._drop_if_new_and_empty(dataset, created)
            raise CommandError(str(exc)) from None
        except StorageError as exc:
            self._drop_if_new_and_empty(dataset, created)
            done = exc.report.imported if exc.report else 0
            raise CommandError(f"{exc} (stopped there; {done} image(s) imported before it are complete)") from None
        if self._drop_if_new_and_empty(dataset, created):
            self.stdout.write(f"nothing was imported, so dataset {dataset.name!r} was not created")
        elif created:
            self.stdout.write(f"created dataset {dataset.name!r}")
        not_images = [name for name, reason in report.rejected if reason == "not an image"]
        for name, reason in report.rejected:
            if reason != "not an image":
                self.stdout.write(f"  skipped {name}: {reason}")
        if not_images:
            shown = ", ".join(not_images[:5]) + (" …" if len(not_images) > 5 else "")
            self.stdout.write(f"  skipped {len(not_images)} file(s) that are not images ({shown})")
        self.stdout.write(self.style.SUCCESS(report.summary()))

    @staticmethod
    def _drop_if_new_and_empty(dataset, created: bool) -> bool:
        """A dataset this command created is removed again when no image went
        into it (every file refused, an empty folder): no empty dataset is left behind."""
        if created and not dataset.images.exists():
            dataset.delete()
            return True
        return False

    def _zip_job(self, path: Path, dataset, options, *, created: bool = False):
        try:
            jobs.check_workers("embed")
        except jobs.JobError as exc:
            raise CommandError(f"{exc} (or import here with --in-process)") from None
        # The job removes its copy when done; the user's file stays.
        copy = import_jobs.uploads_dir() / f"{uuid.uuid4().hex}.zip"
        shutil.copyfile(path, copy)
        job = import_jobs.start_import_job(dataset, str(copy), labels_from_folders=options["labels_from_folders"],
                                    original_name=path.name, check=False)
        self.stdout.write(f"import job #{job.pk} started")
        if options["no_wait"]:
            return
        job = wait_for_job(job, disable=options["no_progress"])
        empty = created and not dataset.images.exists()
        note = f" (dataset {dataset.name!r} was created for it and is empty)" if empty else ""
        if job.status != "succeeded":
            raise CommandError(f"job #{job.pk} {job.status}: {job.error}{note}")
        self.stdout.write(self.style.SUCCESS(job.message))
        if empty:
            self.stdout.write(f"nothing was imported: dataset {dataset.name!r} was created for the job and is empty")
