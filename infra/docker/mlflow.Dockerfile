# MLflow tracking server and model registry with the PostgreSQL driver and the S3 client
# (the upstream image carries neither).
#   docker build -f infra/docker/mlflow.Dockerfile -t phishgate/mlflow:3.17.2 .
# Flags come from the compose file / Kubernetes manifest: --backend-store-uri
# postgresql+psycopg2://..., --artifacts-destination s3://..., --serve-artifacts.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.5

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid mlflow --home-dir /var/lib/mlflow \
        --shell /usr/sbin/nologin mlflow \
    && install -d -o mlflow -g mlflow /var/lib/mlflow
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /var/lib/mlflow
USER 10001:10001
EXPOSE 5000
# /health is exempt from MLflow's Host-header check.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=3).status != 200)"]
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
