# d3ds2: two commands set up a fresh machine.
#   make demo   venv + install + the built-in end-to-end example (CPU, a few minutes)
#   make test   venv + install + the test suite
#   make bench  on a GPU: re-measure the tables of docs/benchmarks.md (benchmarks/run_all.py)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= demo_out
PYTEST_ARGS ?= -n 2 -q

.PHONY: install sysdeps demo test test-gpu bench clean

# open3d (ray casting in data prep) needs the system library libusb-1.0.
sysdeps:
	@ldconfig -p | grep -q libusb-1.0 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq libusb-1.0-0; \
	  else echo "open3d needs libusb-1.0: install it (Debian/Ubuntu: sudo apt-get install libusb-1.0-0)"; exit 1; fi; }

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is named explicitly first: on CPU machines this takes the CPU build, so no resolver pulls CUDA.
$(STAMP): $(BIN)/python pyproject.toml | sysdeps
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[all,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m d3ds2.demo out=$(DEMO)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --out docs/benchmarks.md

clean:
	rm -rf $(VENV) $(DEMO) logs
