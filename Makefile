# d3ds2: two commands set up a fresh machine (from any directory: make -C PATH/TO/d3ds2 demo, or make -f ...).
#   make demo   venv + install + the built-in end-to-end example (CPU, a few minutes)
#   make test   venv + install + the test suite
#   make lock   refresh constraints.txt: unpinned install into a fresh venv, the test suite, then pip freeze
#   make bench  on a GPU: re-measure the tables of docs/benchmarks.md (benchmarks/run_all.py)
ROOT    := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PY      ?= python3
VENV    ?= $(ROOT)/.venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= $(ROOT)/demo_out
PYTEST_ARGS ?= -n 2 -q
# The versions the suite passed with (make lock writes it); CONSTRAINTS= installs the newest allowed instead.
CONSTRAINTS ?= $(ROOT)/constraints.txt
PIN     := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install sysdeps demo test test-gpu bench lock clean

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
$(STAMP): $(BIN)/python $(ROOT)/pyproject.toml $(wildcard $(CONSTRAINTS)) | sysdeps
	$(BIN)/pip install -q $(PIN) "torch==2.13.0"
	$(BIN)/pip install -q $(PIN) -e "$(ROOT)[all,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	cd $(ROOT) && $(BIN)/python -m d3ds2.demo out=$(DEMO)

test: $(STAMP)
	cd $(ROOT) && $(BIN)/python -m pytest $(PYTEST_ARGS)

test-gpu: $(STAMP)
	cd $(ROOT) && $(BIN)/python -m pytest -m gpu -q

# A fresh venv with the newest versions pyproject.toml allows; constraints.txt changes only if the suite passes.
lock:
	rm -rf $(ROOT)/.venv-lock
	$(MAKE) -f $(ROOT)/Makefile test VENV=$(ROOT)/.venv-lock CONSTRAINTS=
	{ echo "# make lock: the versions the test suite passed with (pip install -c constraints.txt)"; \
	  $(ROOT)/.venv-lock/bin/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(ROOT)/constraints.txt
	rm -rf $(ROOT)/.venv-lock

bench: $(STAMP)
	cd $(ROOT) && $(BIN)/python benchmarks/run_all.py --out docs/benchmarks.md

clean:
	rm -rf $(VENV) $(DEMO) $(ROOT)/logs
