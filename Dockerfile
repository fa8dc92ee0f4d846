# syntax=docker/dockerfile:1
# The one image of every ECS container: the Celery worker (ENTRYPOINT), the outbox relay
# (`python -m app.outbox relay`) and the schema migration (`python -m app.store migrate`); the
# CDK task definitions override the entry point for the last two.

# --- build: wheels that need a compiler (pycurl, kombu's async SQS client, links libcurl) ---
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libcurl4-openssl-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PYCURL_SSL_LIBRARY=openssl
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

# --- runtime: the venv plus the shared libraries it links, no compiler ---
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
WORKDIR /app
# Exactly what the worker, relay and migrate import (tests/test_worker.py checks this list).
COPY catalog.py /app/catalog.py
COPY app/ /app/app/
COPY ops/ /app/ops/
COPY bin/ /app/bin/
USER pcelery
ENTRYPOINT ["/app/bin/worker"]
