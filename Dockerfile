# One image for the web app and the workers. For GPU workers, build with a CUDA
# base image: docker build --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DJANGO_SETTINGS_MODULE=cbirsite.settings
# glibc malloc keeps freed memory in the heap: twice the CPU forward pass
# (docs/benchmarks.md, training/core/allocator.py). Read at process start by glibc.
ENV MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647
WORKDIR /app

# g++: torch.compile's CPU backend compiles C++ for large embedding jobs
# (CBIR_COMPILE_MIN_IMAGES, docs/benchmarks.md); without it they run eagerly.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjpeg62-turbo libpng16-16 curl g++ \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md ./
COPY cbirsite ./cbirsite
COPY search ./search
COPY training ./training
COPY templates ./templates
COPY static ./static
COPY manage.py ./
RUN pip install -e ".[monitoring]"
RUN DATABASE_URL=postgresql://build@localhost/none SECRET_KEY=build python manage.py collectstatic --no-input -v0

RUN useradd --create-home --uid 1000 cbir && mkdir -p /data/media /data/weights /data/uploads \
 && chown -R cbir /data /app
USER cbir

EXPOSE 8000
CMD ["gunicorn", "cbirsite.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "3", "--timeout", "120"]
