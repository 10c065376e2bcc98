# `make demo`: set up, then train + evaluate + save the demo model (outputs/demo/).
# `make test`: set up, then run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

demo: setup
	[ -f outputs/demo/data/train.jsonl ] || OMP_NUM_THREADS=2 $(PY) -m data.build_demo --tasks outputs/demo/data
	OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 $(PY) train_sft.py --config configs/demo.yaml

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: setup
	for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done
