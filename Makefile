# The two set-up commands of the README:
#   make demo   creates .venv, installs PyTorch's CPU build and sameguard, runs the quick benchmark
#               (Fashion-MNIST victim, every attack against SAME and every baseline)
#   make test   the same set-up, then the test suite (on a Fashion-MNIST subset shipped in
#               tests/fixtures, so it runs on a machine without the dataset installed)
# The benchmark logs one line per step with its elapsed time on stderr ("[  12.3 s] victim conv3: ..."),
# also when its output is piped; progress bars show on a terminal only.
# Fashion-MNIST comes from Debian's package (sudo apt-get install dataset-fashion-mnist), from a
# folder named by SAMEGUARD_DATA_DIR, or from a verified download allowed by SAMEGUARD_DOWNLOAD=1.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.sameguard-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sameguard bench --config quick $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
