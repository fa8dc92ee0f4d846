# syntax=docker/dockerfile:1
# The one image of every ECS container: the pcelery package, installed from its wheel with the
# locked dependencies. Its console scripts are the entry points: pcelery-worker (the default),
# and pcelery-relay, pcelery-migrate and pcelery-ops, which the CDK task definitions select.
# What goes into the build context is the allowlist in .dockerignore (tests check it against
# pyproject.toml's package-dir): the dev harness, tests and infra never reach the image.

# --- build: wheels that need a compiler (pycurl, kombu's async SQS client, links libcurl) ---
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libcurl4-openssl-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PYCURL_SSL_LIBRARY=openssl
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip
WORKDIR /src
# The lock first: the dependency layer is rebuilt only when the lock changes.
COPY requirements.txt ./
RUN /opt/venv/bin/pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml ./
COPY app/ app/
COPY ops/ ops/
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl

# --- runtime: the venv plus the shared libraries it links, no compiler, no source tree ---
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libcurl4 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin pcelery
COPY --from=build /opt/venv /opt/venv
# AWS's CA bundle for RDS, fetched when the image is built (cdk deploy): with DB_SSLROOTCERT
# pointing here (the CDK task definitions set it) psycopg verifies the database's certificate.
ADD --chmod=644 https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem /etc/ssl/certs/rds-global-bundle.pem
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The ECS task definitions run every container on a read-only root and mount a writable volume on
# /tmp for the workers (Celery's prefork pool keeps a temporary file there). Declared a VOLUME, it is
# seeded from this image's /tmp (mode 1777), so the non-root USER below can write to it.
VOLUME ["/tmp"]
WORKDIR /app
USER pcelery
ENTRYPOINT ["pcelery-worker"]
