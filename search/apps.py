from django.apps import AppConfig


class SearchConfig(AppConfig):
    name = "search"
    verbose_name = "Datasets and search"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from search import delete_jobs, embed_jobs, feedback, jobs, signals, worker  # noqa: F401 - signals: file clean-up on delete

        jobs.register_kind(jobs.JobKind("import", task="search.tasks.run_import", queue="embed",
                                        time_limit_setting="CBIR_IMPORT_TIME_LIMIT"))
        jobs.register_kind(jobs.JobKind("embed", task="search.tasks.finish_embed_job", queue="embed",
                                        chunk_task="search.tasks.embed_chunk", requeue=embed_jobs.queue_chunks,
                                        time_limit_setting="CBIR_FINISH_TIME_LIMIT"))
        jobs.register_kind(jobs.JobKind("delete", task="search.tasks.run_delete", queue="embed",
                                        requeue=delete_jobs.requeue, exclusive=True,
                                        time_limit_setting="CBIR_DELETE_TIME_LIMIT"))
        worker.register_housekeeping(feedback.delete_expired_uploads)  # bounded batches of expired upload embeddings
        worker.connect_worker_signals()
