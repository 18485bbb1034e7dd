# phishgate mail-flow sidecar: `phishgate serve milter` (milter on 8899, or an SMTP content
# filter on 10024 re-injecting to the MTA), /healthz and /metrics on 9102.
#   docker build -f infra/docker/milter.Dockerfile -t phishgate/milter:0.1.0 .
# The sidecar holds no model: it calls the classifier over gRPC. torch comes along only
# because the package's core depends on it; the CPU wheel keeps that small.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN pip install grpcio-tools==1.85.1 \
    && python -m venv /opt/venv
RUN /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY proto proto
COPY services services
COPY training training
COPY bench bench
RUN python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto \
        --grpc_python_out=proto proto/phishgate/v1/classifier.proto \
    && pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install "$(ls /wheels/phishgate-*.whl)[serve]"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 phishgate \
    && useradd --system --uid 10001 --gid phishgate --home-dir /var/lib/phishgate \
        --shell /usr/sbin/nologin phishgate \
    && install -d -o phishgate -g phishgate /var/lib/phishgate
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PHISHGATE_HOME=/var/lib/phishgate \
    PHISHGATE_MILTER_LISTEN_HOST=0.0.0.0 \
    PHISHGATE_MILTER_HEALTH_HOST=0.0.0.0
WORKDIR /var/lib/phishgate
USER 10001:10001
EXPOSE 8899 10024 9102
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9102/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["phishgate"]
CMD ["serve", "milter"]
