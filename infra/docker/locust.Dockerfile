# Load generator: locust running bench/locustfile.py (gRPC Classify calls) against the
# classifier; web UI on 8089, or headless with the usual locust flags.
#   docker build -f infra/docker/locust.Dockerfile -t phishgate/locust:0.1.0 .
#   docker run --rm -v "$PWD/var/reports/bench/payloads:/payloads:ro" phishgate/locust:0.1.0 \
#       --headless -u 8 -r 8 -t 30s --host HOST:50051
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
    && /opt/venv/bin/pip install "$(ls /wheels/phishgate-*.whl)[bench]"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 phishgate \
    && useradd --system --uid 10001 --gid phishgate --home-dir /var/lib/phishgate \
        --shell /usr/sbin/nologin phishgate \
    && install -d -o phishgate -g phishgate /var/lib/phishgate
COPY --from=build /opt/venv /opt/venv
COPY bench/locustfile.py /opt/phishgate/locustfile.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PHISHGATE_BENCH_PAYLOADS=/payloads
WORKDIR /var/lib/phishgate
USER 10001:10001
EXPOSE 8089
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8089/', timeout=2).status != 200)"]
ENTRYPOINT ["locust", "-f", "/opt/phishgate/locustfile.py"]
