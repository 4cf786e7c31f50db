# Two commands from a fresh clone: `make demo`, `make test`. Each creates/updates .venv.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= train,export,cpu,openvino,int8,ray,dev
DEMO_DIR ?= demo_out

.PHONY: venv test demo clean test-aarch64 serve-env serve

# The serving environment (probres-serve; tests/test_serve.py, test_export_triton.py): PyTriton
# pins numpy<2, so it gets its own venv. Debian's python3.11 by default: the Python-backend stub
# of the bundled tritonserver links libpython3.11.so.1.0 from the loader path (a pyenv build also
# works: probres-serve puts its lib/ on LD_LIBRARY_PATH).
SERVE_PY ?= $(firstword $(wildcard /usr/bin/python3.11) python3.11)
SERVE_VENV := .venv-serve

# Reinstall when pyproject.toml or the C extension source changes.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard runtime/_cext/*.c runtime/_cext/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# (grep drops pip's warnings about this machine's local package mirrors)
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]' 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/python -c "import runtime, train, export, benchmarks, torch, torchvision, onnxruntime, cv2, pycocotools"
	touch $@

venv: $(VENV)/.installed

$(SERVE_VENV)/.installed: pyproject.toml setup.py $(wildcard runtime/_cext/*.c runtime/_cext/*.h)
	test -x $(SERVE_VENV)/bin/python || $(SERVE_PY) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q -e '.[serve]' 2>&1 | { grep -v "is ignored" || true; }
	$(SERVE_VENV)/bin/python -c "import pytriton, tritonclient.grpc, onnxruntime, cv2, runtime.serve"
	touch $@

serve-env: $(SERVE_VENV)/.installed

# make serve ENGINE=model.onnx [SERVE_ARGS="--instances 2 --http-port 8000"]
serve: $(SERVE_VENV)/.installed
	@test -n "$(ENGINE)" || { echo "usage: make serve ENGINE=model.onnx|model.plan [SERVE_ARGS='--instances 2']" >&2; exit 2; }
	$(SERVE_VENV)/bin/probres-serve --engine $(ENGINE) $(SERVE_ARGS)

# The serving env is built first; where it cannot be (no python3.11 here), the Triton tests
# skip and say why.
test: $(VENV)/.installed
	$(MAKE) --no-print-directory serve-env || echo "make test: the serve environment could not be built; the Triton tests (tests/test_serve.py, test_export_triton.py) skip" >&2
	$(BIN)/python -m pytest -q

# The C kernel on aarch64 (NEON), from an x86 Debian/Ubuntu machine: installs the cross compiler
# and qemu-user when missing (apt; sudo unless root), checks every kernel bit for bit against the
# numpy twin under qemu (here the test fails instead of skipping), then prints instructions per
# image, generic vs NEON (benchmarks/cext_cross.py).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-aarch64: $(VENV)/.installed
	if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 qemu-aarch64-static >/dev/null; then \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc-aarch64-linux-gnu qemu-user; fi
	FN_REQUIRE_AARCH64=1 $(BIN)/python -m pytest -q tests/test_cext.py -k harness
	$(BIN)/python -m benchmarks.cext_cross

demo: $(VENV)/.installed
	BIN=$(BIN) bash scripts/demo.sh $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR) build *.egg-info
