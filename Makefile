# `make demo`: set up, then train + evaluate + save the demo model (outputs/demo/).
# `make test`: set up, then run the test suite (`make test-all` adds the slow tests).
# `make fuzz`: the property-based fuzz tests at 10,000 cases per property (FUZZ_EXAMPLES=N to change); counts in
#   outputs/fuzz_counts.json. CI runs the same tests at their defaults (a few hundred cases each).
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all bench fuzz
setup:
	bash scripts/setup.sh

demo: setup
	[ -f outputs/demo/data/train.jsonl ] || OMP_NUM_THREADS=2 $(PY) -m data.build_demo --tasks outputs/demo/data
	OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 $(PY) train_sft.py --config configs/demo.yaml

# Two workers (one per core; each test runs single-threaded). Tests marked `slow` (real model widths, a fresh venv,
# transformers' processor mixin) run with `make test-all`.
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --timeout 1200 -m "not slow"

test-all: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --timeout 3600

bench: setup
	for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

FUZZ_EXAMPLES ?= 10000
fuzz: setup
	mkdir -p outputs
	PROTLLM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) PROTLLM_FUZZ_REPORT=outputs/fuzz_counts.json HF_HUB_OFFLINE=1 \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py
