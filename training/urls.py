"""Pages about model versions (comparison, evaluation reports)."""

urlpatterns: list = []
