from __future__ import annotations

from django.core.management.base import BaseCommand

from search import feedback


class Command(BaseCommand):
    help = ("Delete remembered upload embeddings (QueryEmbedding) unseen for CBIR_QUERY_EMBEDDING_DAYS, "
            "in batches by primary key; for cron. The worker's recovery loop and searches also delete a few "
            "batches now and then.")

    def add_arguments(self, parser):
        parser.add_argument("--batch", type=int, default=feedback.CLEANUP_BATCH, help="rows per DELETE")

    def handle(self, *args, **options):
        deleted = feedback.delete_expired_uploads(batch=max(1, options["batch"]), batches=None)
        self.stdout.write(f"deleted {deleted} expired upload embedding(s)")
