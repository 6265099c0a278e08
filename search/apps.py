from django.apps import AppConfig


class SearchConfig(AppConfig):
    name = "search"
    verbose_name = "Datasets and search"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from search import signals  # noqa: F401 - connects file clean-up on delete
