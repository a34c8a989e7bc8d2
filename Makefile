# One command each on a fresh machine: `make install`, `make test`, `make demo`.
PYTHON ?= python3

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements.txt

test:
	$(PYTHON) -m pytest

demo:
	$(PYTHON) pretrain_mae.py --out runs/demo_mae

.PHONY: install test demo
