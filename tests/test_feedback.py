"""Relevance feedback: marks through POST /api/feedback (stored with who, when,
the query and its embedding; 400 and nothing stored for bad input), and
Rocchio-refined searches whose ids equal a numpy computation over the tiny set."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest

from search.feedback import as_array
from search.models import Dataset, Embedding, Feedback, Image, QueryEmbedding
from search.rocchio import ROCCHIO_ALPHA, ROCCHIO_BETA, ROCCHIO_GAMMA, rocchio

QUERY_COLOUR = (230, 30, 30)


def _vectors(version) -> dict[int, np.ndarray]:
    return {pk: as_array(v).astype(np.float64)
            for pk, v in Embedding.objects.filter(model_version=version).values_list("image_id", "vector")}


TIE = 1e-5  # cosine distances closer than this are ties: PostgreSQL sums in float32, numpy here in float64


class Ranking(list):
    """The numpy top k, equal to another ranking when the ids match in order,
    except that images whose distances are within TIE may swap places."""

    def __init__(self, ids, distance):
        super().__init__(ids)
        self.distance = distance

    def __eq__(self, other):
        other = list(other)
        if len(other) != len(self) or any(pk not in self.distance for pk in other):
            return False
        d = [self.distance[pk] for pk in other]
        in_order = all(a <= b + TIE for a, b in zip(d, d[1:]))
        worst = max(d, default=0.0)
        best_left_out = min((v for pk, v in self.distance.items() if pk not in other), default=float("inf"))
        return in_order and best_left_out >= worst - TIE and all(
            a == b or abs(self.distance[a] - self.distance[b]) < TIE for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


def _numpy_ranking(query, positives, negatives, vectors, *, exclude=(), k=10, alpha=ROCCHIO_ALPHA) -> Ranking:
    """Rocchio by hand (float64), then the exact cosine top k, ties by id."""
    moved = np.zeros(len(next(iter(vectors.values()))))
    if query is not None:
        moved += alpha * query
    if positives:
        moved += ROCCHIO_BETA * np.mean([vectors[i] for i in positives], axis=0)
    if negatives:
        moved -= ROCCHIO_GAMMA * np.mean([vectors[i] for i in negatives], axis=0)
    moved /= np.linalg.norm(moved)
    # The service rounds to float32, then the query is bound as halfvec (like the stored vectors).
    moved = moved.astype(np.float32).astype(np.float16).astype(np.float64)
    left_out = set(exclude) | set(negatives)
    distance = {pk: 1 - v @ moved / (np.linalg.norm(v) * np.linalg.norm(moved))
                for pk, v in vectors.items() if pk not in left_out}
    return Ranking(sorted(distance, key=lambda pk: (distance[pk], pk))[:k], distance)


@pytest.fixture
def ids(indexed):
    red = list(Image.objects.filter(dataset=indexed, label="red").order_by("pk").values_list("pk", flat=True))
    blue = list(Image.objects.filter(dataset=indexed, label="blue").order_by("pk").values_list("pk", flat=True))
    return {"red": red, "blue": blue}


@pytest.fixture
def upload(client, indexed, make_image_bytes):
    """A searched upload: its bytes and its SHA-256 (the API's query_sha256)."""
    data = make_image_bytes(QUERY_COLOUR, pattern=7)
    body = client.post("/api/search", {"image": io.BytesIO(data), "k": "5"}).json()
    assert body["query_sha256"] == hashlib.sha256(data).hexdigest()
    return {"data": data, "sha256": body["query_sha256"], "results": [r["image_id"] for r in body["results"]]}


# --- Rocchio ------------------------------------------------------------------

def test_rocchio_moves_the_query_with_the_standard_weights():
    q, p, n = np.array([1.0, 0, 0]), np.array([[0, 1.0, 0], [0, 0, 1.0]]), np.array([[1.0, 1.0, 0]])
    expected = 1.0 * q + 0.75 * p.mean(axis=0) - 0.15 * n.mean(axis=0)
    np.testing.assert_allclose(rocchio(q, p, n), expected / np.linalg.norm(expected), rtol=1e-6)
    np.testing.assert_allclose(rocchio(None, p, np.zeros((0, 3))), [0, 2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="at least one positive"):
        rocchio(None, np.zeros((0, 3)), n)
    with pytest.raises(ValueError, match="zero length"):
        rocchio(np.array([1.0, 0, 0]), np.zeros((0, 3)), np.zeros((0, 3)), gamma=1.0, alpha=0.0)


@pytest.mark.parametrize("restricted", [True, False], ids=["dataset-exact-plan", "collection-hnsw-plan"])
def test_refined_upload_search_returns_the_numpy_rocchio_ranking(client, indexed, tiny_version, ids, upload,
                                                               restricted):
    positives, negatives = [ids["blue"][0], ids["blue"][3]], [ids["red"][1]]
    fields = {"image": io.BytesIO(upload["data"]), "k": "8", "positive": positives, "negative": negatives}
    if restricted:
        fields["dataset"] = indexed.name
    body = client.post("/api/search", fields).json()
    query = as_array(QueryEmbedding.objects.get(sha256=upload["sha256"]).vector).astype(np.float64)
    expected = _numpy_ranking(query, positives, negatives, _vectors(tiny_version), k=8)
    assert [r["image_id"] for r in body["results"]] == expected
    assert body["positive"] == positives and body["negative"] == negatives
    assert negatives[0] not in [r["image_id"] for r in body["results"]]
    # The refinement changed the ranking: the plain search's top 8 differ.
    plain = client.post("/api/search", {"image": io.BytesIO(upload["data"]), "k": "8"}).json()
    assert [r["image_id"] for r in plain["results"]] != list(expected)


def test_several_positives_without_an_image_are_a_multi_image_query(client, indexed, tiny_version, ids):
    positives = [ids["red"][0], ids["blue"][2], ids["blue"][4]]
    body = client.post("/api/search", {"positive": positives, "k": "6"}).json()
    assert [r["image_id"] for r in body["results"]] == _numpy_ranking(None, positives, [], _vectors(tiny_version), k=6)


def test_refined_more_like_this_excludes_the_query_and_matches_numpy(client, indexed, tiny_version, ids):
    query_id, positives, negatives = ids["red"][0], [ids["red"][2]], [ids["blue"][0], ids["blue"][1]]
    body = client.get(f"/api/images/{query_id}/similar", {"k": 7, "positive": positives,
                                                           "negative": negatives}).json()
    vectors = _vectors(tiny_version)
    expected = _numpy_ranking(vectors[query_id], positives, negatives, vectors, exclude=[query_id], k=7)
    assert [r["image_id"] for r in body["results"]] == expected and query_id not in expected


def test_the_refine_page_uses_a_remembered_upload(client, indexed, tiny_version, ids, upload):
    response = client.get("/search/refine", {"query_sha256": upload["sha256"], "positive": ids["blue"][0], "k": 4})
    assert response.status_code == 200
    query = as_array(QueryEmbedding.objects.get(sha256=upload["sha256"]).vector).astype(np.float64)
    expected = _numpy_ranking(query, [ids["blue"][0]], [], _vectors(tiny_version), k=4)
    assert [h.image_id for h in response.context["result"].hits] == expected


@pytest.mark.parametrize("fields, message", [
    ({"positive": ["x1"]}, "must be image ids"),
    ({"positive": ["999999999"]}, "no image with id 999999999"),
    ({"negative": ["-3"]}, "must be image ids"),
    ({"positive": ["\u00b2"]}, "must be image ids"),
    ({"negative": ["\u2460"]}, "must be image ids"),
    ({"negative": ["BOTH"], "positive": ["BOTH"]}, "both positive and negative"),
    ({"negative": ["RED0"], "image": None}, "at least one positive"),
    ({"positive": ["RED0", "RED1", "RED2"]}, "too many image ids"),
    ({"positive": ["OTHER"]}, "is not in dataset"),
    ({"positive": ["UNINDEXED"], "dataset": None}, "is not indexed by"),
    ({"query_sha256": "ab" * 32, "positive": ["RED0"], "image": None}, "no recent search with an upload"),
    ({"query_sha256": "not-a-hash", "image": None}, "64 hexadecimal digits"),
])
def test_bad_refinements_are_400_with_what_is_wrong(client, indexed, ids, settings, fields, message,
                                                    make_image_bytes):
    settings.CBIR_FEEDBACK_MAX_IDS = 2
    other = Dataset.objects.create(name="elsewhere")
    unindexed = Image.objects.create(dataset=other, file="x.png", thumbnail="x.jpg", sha256="0" * 64,
                                     original_filename="x.png", width=1, height=1, split="train")
    names = {"RED0": ids["red"][0], "RED1": ids["red"][1], "RED2": ids["red"][2], "BOTH": ids["red"][3],
             "OTHER": unindexed.pk, "UNINDEXED": unindexed.pk}
    # An image in every request but the marks-only ones, so that "nothing
    # stored" (no QueryEmbedding for the upload) can fail.
    form: dict = {"k": "3", "dataset": indexed.name, "image": io.BytesIO(make_image_bytes(QUERY_COLOUR, pattern=3))}
    for name, values in fields.items():
        if values is None:
            form.pop(name, None)
        else:
            form[name] = [str(names.get(v, v)) for v in values] if isinstance(values, list) else values
    before = QueryEmbedding.objects.count()
    response = client.post("/api/search", form)
    assert response.status_code == 400, response.content
    assert message in response.json()["error"]
    assert QueryEmbedding.objects.count() == before


def test_the_pages_show_a_bad_refinement_as_a_400_message(client, indexed, ids):
    for url in (f"/images/{ids['blue'][0]}/similar/", "/search/refine"):
        page = client.get(url, {"positive": ["999999999"]})
        assert page.status_code == 400 and b"no image with id 999999999" in page.content


# --- Marks --------------------------------------------------------------------

def test_a_mark_on_an_upload_stores_the_query_embedding_who_and_when(client, indexed, tiny_version, upload):
    result = upload["results"][0]
    response = client.post("/api/feedback", {"query_sha256": upload["sha256"], "image_id": result,
                                             "verdict": "right", "model": tiny_version.name})
    assert response.status_code == 201, response.content
    mark = Feedback.objects.get()
    assert (mark.model_version, mark.query_image, mark.query_sha256, mark.result_id, mark.verdict) == (
        tiny_version, None, upload["sha256"], result, "right")
    stored = as_array(QueryEmbedding.objects.get(sha256=upload["sha256"]).vector)
    assert np.array_equal(as_array(mark.query_vector), stored)
    assert mark.user is None and mark.session_key == client.session.session_key and mark.created is not None
    # Marking again replaces the mark; it does not add one.
    client.post("/api/feedback", {"query_sha256": upload["sha256"], "image_id": result, "verdict": "wrong"})
    assert list(Feedback.objects.values_list("verdict", flat=True)) == ["wrong"]


def test_a_signed_in_users_marks_on_an_indexed_query_name_the_user(client, indexed, ids, django_user_model):
    user = django_user_model.objects.create_user("ana", password="pw-123456")
    client.force_login(user)
    response = client.post("/api/feedback", {"query_image_id": ids["red"][0], "image_id": [ids["red"][1],
                                             ids["blue"][0]], "verdict": "wrong"})
    assert response.status_code == 201 and response.json()["stored"] == 2
    assert set(Feedback.objects.values_list("user__username", "query_image_id", "verdict", "session_key")) == {
        ("ana", ids["red"][0], "wrong", "")}


@pytest.mark.parametrize("fields, message", [
    ({"verdict": "maybe"}, "verdict must be one of right, wrong"),
    ({"verdict": None}, "verdict must be one of right, wrong"),
    ({"image_id": ["999999999"]}, "no image with id 999999999"),
    ({"image_id": ["x"]}, "must be image ids"),
    ({"image_id": ["\u00b2"]}, "must be image ids"),
    ({"query_image_id": ["\u2460"]}, "must be image ids"),
    ({"image_id": None}, "no result was named"),
    ({"image_id": ["RED1", "RED2", "BLUE0"]}, "too many image ids"),
    ({"image_id": ["OTHER"]}, "is not in dataset"),
    ({"image_id": ["OTHER"], "dataset": None}, "is not indexed by"),
    ({"image_id": ["RED0"]}, "the query itself"),
    ({"query_image_id": ["999999999"]}, "no image with id 999999999"),
    ({"query_image_id": None}, "exactly one of query_image_id"),
    ({"query_sha256": "ab" * 32}, "exactly one of query_image_id"),
    ({"query_image_id": None, "query_sha256": "ab" * 32}, "no recent search with an upload"),
    ({"model": "some-older-version"}, "search now uses"),
    ({"dataset": "no-such-set"}, "unknown dataset"),
])
def test_bad_marks_are_400_and_store_nothing(client, indexed, ids, settings, fields, message):
    settings.CBIR_FEEDBACK_MAX_IDS = 2
    other = Dataset.objects.create(name="elsewhere")
    outsider = Image.objects.create(dataset=other, file="x.png", thumbnail="x.jpg", sha256="0" * 64,
                                    original_filename="x.png", width=1, height=1, split="train")
    names = {"RED0": ids["red"][0], "RED1": ids["red"][1], "RED2": ids["red"][2], "BLUE0": ids["blue"][0],
             "OTHER": outsider.pk}
    form = {"query_image_id": [str(ids["red"][0])], "image_id": [str(ids["red"][1])], "verdict": "right",
            "dataset": indexed.name}
    for name, values in fields.items():
        if values is None:
            form.pop(name)
        else:
            form[name] = [str(names.get(v, v)) for v in values] if isinstance(values, list) else values
    response = client.post("/api/feedback", form)
    assert response.status_code == 400, response.content
    assert message in response.json()["error"]
    assert Feedback.objects.count() == 0


def test_marks_need_a_csrf_token_on_a_cookie_session(indexed, ids):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    response = client.post("/api/feedback", {"query_image_id": ids["red"][0], "image_id": ids["red"][1],
                                             "verdict": "right"})
    assert response.status_code == 403 and "CSRF" in response.json()["error"]
    client.get("/")  # sets the csrftoken cookie
    token = client.cookies["csrftoken"].value
    response = client.post("/api/feedback", {"query_image_id": ids["red"][0], "image_id": ids["red"][1],
                                             "verdict": "right"}, headers={"X-CSRFToken": token})
    assert response.status_code == 201 and Feedback.objects.count() == 1


def test_marks_follow_the_search_login_rule_and_rate_limit(client, indexed, ids, settings):
    form = {"query_image_id": ids["red"][0], "image_id": ids["red"][1], "verdict": "right"}
    settings.CBIR_SEARCH_REQUIRES_LOGIN = True
    assert client.post("/api/feedback", form).status_code == 401
    settings.CBIR_SEARCH_REQUIRES_LOGIN = False
    settings.CBIR_SEARCH_RATE_LIMIT = "1/m"
    assert client.post("/api/feedback", form).status_code == 201
    refused = client.post("/api/feedback", form)
    assert refused.status_code == 429 and "Retry-After" in refused
    assert Feedback.objects.count() == 1


def test_wrong_method_is_405(client, indexed):
    assert client.get("/api/feedback").status_code == 405


def test_deleting_an_image_deletes_its_marks(client, indexed, ids):
    client.post("/api/feedback", {"query_image_id": ids["red"][0], "image_id": [ids["red"][1], ids["red"][2]],
                                  "verdict": "right"})
    client.post("/api/feedback", {"query_image_id": ids["red"][3], "image_id": ids["red"][4], "verdict": "wrong"})
    Image.objects.filter(pk=ids["red"][1]).delete()
    assert Feedback.objects.count() == 2
    Image.objects.filter(pk=ids["red"][3]).delete()  # as a query
    assert list(Feedback.objects.values_list("result_id", flat=True)) == [ids["red"][2]]


def test_staff_see_marks_and_export_them_as_csv(admin_client, client, indexed, ids, tiny_version):
    client.post("/api/feedback", {"query_image_id": ids["red"][0], "image_id": [ids["red"][1], ids["blue"][0]],
                                  "verdict": "right"})
    page = admin_client.get("/admin/search/feedback/")
    assert page.status_code == 200 and b"image #" in page.content
    marks = list(Feedback.objects.order_by("pk"))
    response = admin_client.post("/admin/search/feedback/", {"action": "export_csv", "index": "0",
                                                             "_selected_action": [m.pk for m in marks]})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    lines = response.content.decode().strip().splitlines()
    assert lines[0].startswith("id,created,model_version,query_image_id")
    assert len(lines) == 3 and f",{tiny_version.name},{ids['red'][0]},," in lines[1]
    assert client.get("/admin/search/feedback/").status_code == 302  # not staff: the login page


def test_a_refined_query_is_one_statement_through_the_hnsw_index(indexed, tiny_version, ids):
    from search import hnsw
    from search.neighbours import explain, neighbours_queryset

    vectors = _vectors(tiny_version)
    moved = rocchio(vectors[ids["red"][0]], np.stack([vectors[ids["blue"][0]]]), np.stack([vectors[ids["red"][1]]]))
    queryset = neighbours_queryset(tiny_version, vector=moved, exclude_image_ids=[ids["red"][1], ids["red"][0]])
    plan = explain(queryset, 10)
    assert f"Index Scan using {hnsw.index_name(tiny_version)} " in plan and "image_id" in plan


def test_an_api_token_marks_without_a_csrf_token_as_its_owner(indexed, ids, django_user_model):
    from django.test import Client

    from search.models import ApiToken

    owner = django_user_model.objects.create_user("partner", password="a-long-password-1", is_staff=True)
    token = ApiToken(name="partner", user=owner)
    key = token.set_new_key()
    token.save()
    response = Client(enforce_csrf_checks=True).post(
        "/api/feedback", {"query_image_id": ids["red"][0], "image_id": ids["red"][1], "verdict": "right"},
        headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 201
    assert Feedback.objects.get().user == owner


# --- Uploads belong to who searched; marks are stored once ------------------------

def test_another_session_cannot_name_an_upload(client, indexed, ids, upload):
    from django.test import Client

    other = Client()
    unknown = "cd" * 32
    for sha in (upload["sha256"], unknown):
        page = other.get("/search/refine", {"query_sha256": sha, "positive": ids["blue"][0]})
        assert page.status_code == 400 and b"no recent search with an upload" in page.content
        api = other.post("/api/search", {"query_sha256": sha, "positive": ids["blue"][0]})
        assert api.status_code == 400 and "no recent search with an upload" in api.json()["error"]
        mark = other.post("/api/feedback", {"query_sha256": sha, "image_id": upload["results"][0],
                                            "verdict": "right"})
        assert mark.status_code == 400 and "no recent search with an upload" in mark.json()["error"]
    # The same message for both: the answer tells nothing about who searched what.
    answers = {other.post("/api/search", {"query_sha256": sha, "positive": ids["blue"][0]}).json()["error"]
               .replace(sha[:12], "") for sha in (upload["sha256"], unknown)}
    assert len(answers) == 1
    assert Feedback.objects.count() == 0
    # The searcher's own session still can.
    assert client.get("/search/refine", {"query_sha256": upload["sha256"],
                                         "positive": ids["blue"][0]}).status_code == 200


def test_a_signed_in_user_keeps_an_upload_across_sessions(client, indexed, ids, make_image_bytes,
                                                          django_user_model):
    from django.test import Client

    user = django_user_model.objects.create_user("bo", password="pw-123456")
    client.force_login(user)
    sha = client.post("/api/search", {"image": io.BytesIO(make_image_bytes(QUERY_COLOUR, pattern=5))}).json()[
        "query_sha256"]
    assert QueryEmbedding.objects.get(sha256=sha).user == user
    again = Client()
    again.force_login(user)
    assert again.get("/search/refine", {"query_sha256": sha, "positive": ids["blue"][0]}).status_code == 200


def test_an_image_deleted_between_parse_and_store_is_a_400(client, indexed, ids, monkeypatch):
    from search import feedback

    parse = feedback.parse_marks

    def parse_then_delete(*args, **kwargs):
        marks = parse(*args, **kwargs)
        Image.objects.filter(pk=ids["red"][1]).delete()
        return marks

    monkeypatch.setattr(feedback, "parse_marks", parse_then_delete)
    response = client.post("/api/feedback", {"query_image_id": ids["red"][0],
                                             "image_id": [ids["red"][1], ids["red"][2]], "verdict": "right"})
    assert response.status_code == 400, response.content
    assert "no longer exists" in response.json()["error"]
    assert Feedback.objects.count() == 0


def test_an_upload_expiring_between_parse_and_store_still_stores_the_parsed_vector(client, indexed, upload,
                                                                                  monkeypatch):
    from search import feedback

    parse = feedback.parse_marks

    def parse_then_expire(*args, **kwargs):
        marks = parse(*args, **kwargs)
        QueryEmbedding.objects.all().delete()
        return marks

    monkeypatch.setattr(feedback, "parse_marks", parse_then_expire)
    response = client.post("/api/feedback", {"query_sha256": upload["sha256"], "image_id": upload["results"][0],
                                             "verdict": "right"})
    assert response.status_code == 201, response.content
    assert Feedback.objects.get().query_vector is not None


def test_the_same_mark_twice_is_one_row_and_the_database_refuses_a_duplicate(client, indexed, ids, upload):
    from django.db import IntegrityError, transaction

    form = {"query_image_id": ids["red"][0], "image_id": ids["red"][1], "verdict": "right"}
    assert client.post("/api/feedback", form).status_code == 201
    assert client.post("/api/feedback", form).status_code == 201
    assert Feedback.objects.count() == 1
    upload_form = {"query_sha256": upload["sha256"], "image_id": upload["results"][0], "verdict": "wrong"}
    assert client.post("/api/feedback", upload_form).status_code == 201
    assert client.post("/api/feedback", upload_form).status_code == 201
    assert Feedback.objects.count() == 2
    # A double click's second insert (past the first's) is refused by the unique constraints.
    for first in Feedback.objects.all():
        first.pk = None
        with pytest.raises(IntegrityError), transaction.atomic():
            first.save()


def _expired_uploads(version, n: int) -> np.ndarray:
    """n upload embeddings of `version` last seen a day past CBIR_QUERY_EMBEDDING_DAYS; returns their vector."""
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    old = timezone.now() - timedelta(days=settings.CBIR_QUERY_EMBEDDING_DAYS + 1)
    vector = np.ones(int(version.dimension), dtype=np.float32)
    QueryEmbedding.objects.bulk_create([
        QueryEmbedding(model_version=version, sha256=f"{i:064x}", vector=vector, last_seen=old,
                       session_key="s") for i in range(n)])
    return vector


def test_expired_uploads_are_deleted_in_bounded_batches(indexed, tiny_version):
    from django.utils import timezone

    from search import feedback

    vector = _expired_uploads(tiny_version, 25)
    QueryEmbedding.objects.create(model_version=tiny_version, sha256="f" * 64, vector=vector,
                                  last_seen=timezone.now(), session_key="s")
    assert feedback.delete_expired_uploads(batch=4, batches=2) == 8
    assert QueryEmbedding.objects.count() == 18
    assert feedback.delete_expired_uploads(batch=4, batches=None) == 17
    assert list(QueryEmbedding.objects.values_list("sha256", flat=True)) == ["f" * 64]


def test_the_search_image_command_remembers_nothing(indexed, tmp_path, make_image_bytes):
    from django.core.management import call_command

    path = tmp_path / "q.png"
    path.write_bytes(make_image_bytes(QUERY_COLOUR, pattern=2))
    call_command("search_image", str(path), "-k", "2", stdout=io.StringIO())
    assert QueryEmbedding.objects.count() == 0


def test_the_forget_uploads_command_deletes_every_expired_upload(indexed, tiny_version):
    from django.core.management import call_command

    _expired_uploads(tiny_version, 7)
    out = io.StringIO()
    call_command("forget_uploads", "--batch", "2", stdout=out)
    assert "deleted 7" in out.getvalue() and QueryEmbedding.objects.count() == 0


def test_a_full_refined_page_runs_no_count(indexed, tiny_version, ids):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from search import services

    with CaptureQueriesContext(connection) as full:
        result = services.search_by_image(ids["red"][0], k=2, positive=[ids["red"][1]], negative=[ids["blue"][0]])
    assert len(result.hits) == 2 and result.notice is None
    assert not [q["sql"] for q in full.captured_queries if "COUNT(" in q["sql"].upper()]
    with CaptureQueriesContext(connection) as short:
        result = services.search_by_image(ids["red"][0], k=100, positive=[ids["red"][1]])
    assert result.notice and any("COUNT(" in q["sql"].upper() for q in short.captured_queries)


def test_workers_delete_expired_uploads_in_their_recovery_loop():
    # Registered by SearchConfig.ready: the job kernel (search.worker) imports no feature module.
    from search import feedback, worker

    assert feedback.delete_expired_uploads in worker._housekeeping
