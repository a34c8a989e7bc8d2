# One command each on a fresh machine: `make install`, `make test`, `make demo`.
PYTHON ?= python3

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install -r requirements-formats.txt   # optional: .mat scenes in formats.py

test:
	$(PYTHON) -m pytest

# MAE pre-training -> linear probe -> evaluation on the bundled Indian Pines
# (about 5 min on 2 CPU cores; prints OA 75.24 / AA 70.87 / mIoU 60.34 on a bf16 CPU, see README).
demo:
	rm -rf runs/demo_mae runs/demo_probe
	$(PYTHON) pretrain_mae.py --out runs/demo_mae
	$(PYTHON) finetune_seg.py --init runs/demo_mae/ckpt.pt --lr 1e-2 --steps 300 --out runs/demo_probe --eval-every 1000
	$(PYTHON) eval.py --ckpt runs/demo_probe/ckpt.pt --attention

.PHONY: install test demo
