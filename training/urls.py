"""Pages about model versions (comparison, evaluation reports)."""

from django.urls import path

from training import views

urlpatterns: list = [
    path("models/", views.models_page, name="models"),
    path("models/report.json", views.report_json, name="models-report-json"),
    path("models/report.csv", views.report_csv, name="models-report-csv"),
    path("models/<int:version_id>/examples", views.model_examples, name="model-examples"),
]
