# The two set-up commands of the README:
#   make demo   creates .venv, installs PyTorch's CPU build and sameguard, runs the quick benchmark
#               (Fashion-MNIST victim, every attack against SAME and every baseline)
#   make test   the same set-up, then the test suite (on a Fashion-MNIST subset shipped in
#               tests/fixtures, so it runs on a machine without the dataset installed)
# The benchmark logs one line per step with its elapsed time on stderr ("[  12.3 s] victim conv3: ..."),
# also when its output is piped; progress bars show on a terminal only.
# PyTorch: TORCH_INDEX names the package index torch is installed from. Empty (the default): pip's own
# configured index, which serves the CPU build on the machine this repository is developed on. On an
# ordinary Linux machine with PyPI, torch==$(TORCH_VERSION) from PyPI is the multi-GB CUDA build, so point
# pip at PyTorch's CPU wheels instead:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Fashion-MNIST comes from Debian's package (sudo apt-get install dataset-fashion-mnist), from a
# folder named by SAMEGUARD_DATA_DIR, or from a verified download allowed by SAMEGUARD_DOWNLOAD=1.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
TORCH_PIP_ARGS = $(if $(strip $(TORCH_INDEX)),--index-url $(strip $(TORCH_INDEX)))
BIN := $(VENV)/bin
STAMP := $(VENV)/.sameguard-installed

.PHONY: demo test install clean fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build first: an unpinned torch would pull a multi-GB CUDA build (see TORCH_INDEX above).
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sameguard bench --config quick $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The longer fuzzing run: Schemathesis against the live service's OpenAPI document and the decoders'
# Hypothesis properties, with EXAMPLES examples per operation and mode (the test suite runs 15).
fuzz: $(STAMP)
	SAMEGUARD_FUZZ_EXAMPLES=$(or $(EXAMPLES),1000) $(BIN)/python -m pytest -q tests/service/test_fuzz_openapi.py \
		tests/service/test_decoding_properties.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
