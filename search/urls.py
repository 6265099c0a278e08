from django.urls import path

from search import views

urlpatterns = [
    path("", views.index, name="index"),
    path("search/", views.search_page, name="search"),
    path("images/<int:image_id>/similar/", views.similar_page, name="similar"),
    path("api/search", views.api_search, name="api-search"),
    path("api/images/<int:image_id>/similar", views.api_similar, name="api-similar"),
]
