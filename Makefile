# The two commands of the README:  make run  (local serve on the CPU)  and  make test.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL := models/tiny-llama
CONFIG ?= configs/local-cpu.yaml
# The project's extras: the CPU build here; GPU nodes install with EXTRAS=gpu (deploy/aws/cluster.yaml).
EXTRAS ?= cpu,test

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed $(MODEL)/.complete

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# The registry's torchvision/torchaudio/torchcodec break transformers beside the CPU torch.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

$(MODEL)/.complete: $(VENV)/.installed
	$(PY) -m serve_app.tiny_model $(MODEL)

run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/serve-local $(CONFIG)

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests/cpu

bench: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m serve_app.bench.side_by_side --out bench/results/cpu

clean:
	rm -rf $(VENV) $(MODEL)
