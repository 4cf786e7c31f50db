# Two commands from a fresh clone: `make demo`, `make test`. Each creates/updates .venv.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= train,export,cpu,dev
DEMO_DIR ?= demo_out

.PHONY: venv test demo clean

# Reinstall when pyproject.toml or the C extension source changes.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard runtime/_cext/*.c)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# (grep drops pip's warnings about this machine's local package mirrors)
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]' 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/python -c "import runtime, train, export, benchmarks, torch, torchvision, onnxruntime, cv2, pycocotools"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

demo: $(VENV)/.installed
	BIN=$(BIN) bash scripts/demo.sh $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR) build *.egg-info
