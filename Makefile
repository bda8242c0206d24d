# kd3 — one target per pipeline stage. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= pipelines/demo.yaml
RUN ?= runs/demo
# extra arguments for a stage, e.g. ARGS="--overwrite train.epochs=3"
ARGS ?=
# torch wheels: this pin installs from the local wheel cache here; elsewhere e.g.
# TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# extras `make test` installs as well, so the end-to-end tests of download.distributor=pyspark / ray
# run instead of skipping (TEST_EXTRAS= leaves them out; the tests then skip)
TEST_EXTRAS ?= spark,ray
BENCH_ARGS ?=

# processes per node for score / train / train-kd / evaluate: NPROC=1 runs kd3 itself, more launch it
# through torchrun (one process per GPU; on CPU, gloo); TORCHRUN_ARGS e.g. "--nnodes 2 --rdzv-backend c10d
# --rdzv-endpoint host:29500 --rdzv-id job42" for several nodes
NPROC ?= 1
TORCHRUN_ARGS ?=
ifeq ($(NPROC),1)
LAUNCH = $(KD3)
else
LAUNCH = $(VENV)/bin/python -m torch.distributed.run --nproc_per_node $(NPROC) $(TORCHRUN_ARGS) -m kd3.cli
endif

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1
KD3 := $(VENV)/bin/kd3
STAMP := $(VENV)/.kd3-installed
comma := ,
TEST_STAMP := $(VENV)/.kd3-test-extras$(if $(TEST_EXTRAS),-$(subst $(comma),-,$(TEST_EXTRAS)))

.PHONY: help install demo test bench bench-quality demo-data download score dedup select train train-kd average evaluate inspect validate prepare-teacher bench-gtn

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) RUN=$(RUN) ARGS='$(ARGS)' NPROC=$(NPROC) (torchrun processes for score, train, evaluate)"

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	# .[dev] = pytest + the demo extra (scikit-learn, scikit-image, mlxtend), which demo and test need
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(if $(TEST_EXTRAS),$(VENV)/bin/python -m pip install -q -e '.[dev$(comma)$(TEST_EXTRAS)]')
	@touch $(TEST_STAMP)

install: $(STAMP) ## create .venv and install kd3 (fast when already installed)

demo: $(STAMP) ## run the whole pipeline on the embedded demo (CPU, minutes)
	$(KD3) demo-data --config $(CONFIG) --run-dir $(RUN) --resume $(ARGS)
	$(KD3) download --config $(CONFIG) --run-dir $(RUN) --resume $(ARGS)
	$(KD3) score --config $(CONFIG) --run-dir $(RUN) --resume $(ARGS)
	$(KD3) dedup --config $(CONFIG) --run-dir $(RUN) --resume $(ARGS)
	$(KD3) select --config $(CONFIG) --run-dir $(RUN) --resume $(ARGS)
	$(KD3) train --config $(CONFIG) --run-dir $(RUN) --resume $(ARGS)
	$(KD3) train --config $(CONFIG) --run-dir $(RUN) --resume train.objective=kd train.selector=all train.output=train-kd $(ARGS)
	$(KD3) average --config $(CONFIG) --run-dir $(RUN) --resume $(ARGS)
	$(KD3) evaluate --config $(CONFIG) --run-dir $(RUN) --resume $(ARGS)
	$(KD3) inspect --config $(CONFIG) --run-dir $(RUN) --resume $(ARGS)
	@echo "Run folder: $(RUN)   evaluation: $(RUN)/evaluate/report.md   selection report: $(RUN)/inspect/index.html"

test: $(TEST_STAMP) ## run the test suite (TEST_EXTRAS: the optional extras installed for it, spark,ray) (pytest's exit 5, "no tests collected", is a failure too)
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests; there must be tests" >&2; fi; \
	exit $$status

bench: $(STAMP) ## performance ratios of every stage vs its physical limit → BENCHMARKS.md (~15 min on 2 CPU cores)
	$(VENV)/bin/python benchmarks/perf.py --write $(BENCH_ARGS)

bench-quality: $(STAMP) ## quality benchmark (methods × seeds × scenarios) → BENCHMARKS.md; BENCH_ARGS=--quick etc.
	$(KD3) bench --config benchmarks/quality.yaml $(BENCH_ARGS)

bench-gtn: $(STAMP) ## generic teacher vs plain teacher, KD³ into 3 pool students → BENCHMARKS.md (own section)
	$(KD3) bench --config benchmarks/generic_teacher.yaml $(BENCH_ARGS)

validate: $(STAMP) ## validate CONFIG without running anything
	$(KD3) validate --config $(CONFIG)

demo-data: $(STAMP) ## train the demo teacher, write the demo web pool + URL list
	$(KD3) demo-data --config $(CONFIG) --run-dir $(RUN) $(ARGS)

download: $(STAMP) ## URL list -> webdataset shards + parquet (img2dataset)
	$(KD3) download --config $(CONFIG) --run-dir $(RUN) $(ARGS)

score: $(STAMP) ## teacher outputs per sample, cached by uid
	$(LAUNCH) score --config $(CONFIG) --run-dir $(RUN) $(ARGS)

dedup: $(STAMP) ## remove exact / near-duplicate pool images and copies of evaluation images
	$(KD3) dedup --config $(CONFIG) --run-dir $(RUN) $(ARGS)

select: $(STAMP) ## selection manifest
	$(KD3) select --config $(CONFIG) --run-dir $(RUN) $(ARGS)

prepare-teacher: $(STAMP) ## generic teacher (GTN) for a pool of students → RUN/prepare-teacher/teacher.pt (needs demo-data)
	$(KD3) prepare-teacher --config $(CONFIG) --run-dir $(RUN) $(ARGS)

train: $(STAMP) ## train the student (checkpoint + metrics per epoch)
	$(LAUNCH) train --config $(CONFIG) --run-dir $(RUN) $(ARGS)

train-kd: $(STAMP) ## train the plain-KD baseline (whole pool) into RUN/train-kd
	$(LAUNCH) train --config $(CONFIG) --run-dir $(RUN) train.objective=kd train.selector=all train.output=train-kd $(ARGS)

average: $(STAMP) ## write the WAKD / SMA / SWAD averages kept by train as student checkpoints
	$(KD3) average --config $(CONFIG) --run-dir $(RUN) $(ARGS)

evaluate: $(STAMP) ## accuracy / agreement / KL / ECE / per-class report + reliability diagrams
	$(LAUNCH) evaluate --config $(CONFIG) --run-dir $(RUN) $(ARGS)

inspect: $(STAMP) ## what was selected and why: summary, plots, contact sheets, index.html
	$(KD3) inspect --config $(CONFIG) --run-dir $(RUN) $(ARGS)
