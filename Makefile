# Two entry points: `make demo` and `make test`. Both create .venv if it is missing and
# install the known-good pinned set in requirements.lock (torch 2.14.1, torchvision 0.29.1, ...).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || df -Pk $(VENV) | awk 'NR == 2 && $$4 < 6 * 1024 * 1024 { printf "make install: torch 2.14.1 with its CUDA libraries needs about 6 GiB in $(VENV), " \
		"and %.1f GiB are free; free some space and run make again\n", $$4 / 1024 / 1024; exit 2 }' >&2
	$(PY) -m pip install -q --no-cache-dir torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-cache-dir -r requirements.lock
	$(PY) -m pip install -q --no-cache-dir --no-build-isolation --no-deps -e .
	command -v nft >/dev/null || (apt-get update -qq && apt-get install -y -qq nftables) || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/p2pnode testnet --nodes 4 --split 0-1,2-3,4-6,7-9 --compare local,central,dsgd \
		--json results/demo.json --plot results/demo.png

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q --durations=15

clean:
	rm -rf $(VENV) results
