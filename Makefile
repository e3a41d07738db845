# Two entry points: `make demo` (set up, then run the MiniMMEdit quick demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): requirements-ci.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-ci.txt 2>&1 | grep -v "dependency resolver\|easyeditor .* requires\|which is incompatible" || true
	$(PIP) install -q --no-deps easyeditor==0.0.1.dev0 fairscale==0.4.13
	$(PIP) install -q --no-deps -e .
	$(PY) -c "import easyedit_odedit, easyeditor"
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(VENV)/bin/odedit demo --out results/demo

BENCH_WORKERS ?= 2

bench: venv
	$(VENV)/bin/odedit bench --config hparams/bench/full.yaml --out benchmarks/results/full --workers $(BENCH_WORKERS)

clean:
	rm -rf $(VENV) results
