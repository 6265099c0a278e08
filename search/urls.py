from django.urls import path

from search import views

urlpatterns = [
    path("", views.index, name="index"),
    path("search/", views.search_page, name="search"),
    path("search/refine", views.refine_page, name="refine"),
    path("images/<int:image_id>/similar/", views.similar_page, name="similar"),
    path("healthz", views.healthz, name="healthz"),
    path("api/search", views.api_search, name="api-search"),
    path("api/images/<int:image_id>/similar", views.api_similar, name="api-similar"),
    path("api/feedback", views.api_feedback, name="api-feedback"),
]

from search import job_views  # noqa: E402

urlpatterns += [
    path("jobs/", job_views.job_list, name="job-list"),
    path("jobs/<int:job_id>/", job_views.job_detail, name="job-detail"),
    path("jobs/<int:job_id>/status", job_views.job_status, name="job-status"),
    path("jobs/<int:job_id>/cancel", job_views.job_cancel, name="job-cancel"),
    path("jobs/<int:job_id>/rerun", job_views.job_rerun, name="job-rerun"),
]
