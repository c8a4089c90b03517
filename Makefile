# Two commands for a newcomer:  `make demo` (the embedded main job) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint venv pipeline clean realshape images test-images

# torch 2.14.1 / torchvision 0.29.1 and friends resolve from the machine's local wheel indexes
# (pip.conf extra-index-url); requirements.lock pins the whole set that was tested together.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

## the embedded main job: the whole DVC chain on the synthetic world, then the results table
demo: venv
	dvc repro
	sdsclip results

## the test suite (what CI runs): every test, lint and types included
test: venv
	$(PY) -m pytest -q --durations=10

## the inner loop (<= 2 min): every test not marked slow (end-to-end runs, the images)
test-fast: venv
	$(PY) -m pytest -q -m "not slow" --durations=5

## style and types only (also tests/test_lint.py and the pre-commit hooks): ruff lint + format, mypy on src/sdsclip
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

## the real path end to end at the real shapes: random-init ViT-B-32-quickgelu (OpenAI .pt) + SD-1.5-shaped dir,
## 64 COCO-format JPEGs, every stage from ingest to register, a few steps on the CPU (~10 min, peak RSS ~10 GiB;
## CI runs it after `make test`). Wall time + peak RSS per stage: realshape/summary.json (fixtures cached there).
realshape: venv
	sdsclip realshape --workdir realshape

## both images (CPU ghcr.io/sdsclip/sdsclip:VERSION, CUDA :VERSION-cuda) on this machine, from a Debian base made
## here when Docker Hub is out of reach; needs a running docker engine (docker/build.sh lists the overrides)
images:
	bash docker/build.sh

## the built images, run as a cluster runs them: the whole pipeline in the CPU image (kfp.local DockerRunner),
## train/evaluate on a read-only root, the smoke test's local checks, no secrets in the layers (~6 min)
test-images: venv
	SDSCLIP_REQUIRE_IMAGES=1 $(PY) -m pytest -q -m images

## after editing params.yaml, components/ or the pipeline: recompile the committed Kubeflow pipeline YAML and
## refresh the params ConfigMap source of k8s/ (tests fail while either is stale)
pipeline: venv
	sdsclip pipeline compile --out pipelines/sdsclip_pipeline.yaml
	cp params.yaml k8s/base/params.yaml

clean:
	rm -rf data models metrics scores logs mlflow.db mlruns mlartifacts
