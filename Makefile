# Quick start:  make demo   (venv + install + demo dataset + train + evaluate)
#               make demo METHOD=self_classifier   (the same with Self-Classifier instead of TWIST)
#               make test   (venv + install + test suite; what CI runs)
#               make gpu-check   (on a GPU machine: CUDA tests + profiles, no install; tools/gpu_check.py)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
METHOD ?= twist
DEMO_DATA ?= data/demo
ifeq ($(METHOD),twist)
DEMO_CONFIG ?= configs/demo.yaml
DEMO_RUN ?= runs/demo
else
DEMO_CONFIG ?= configs/demo_$(METHOD).yaml
DEMO_RUN ?= runs/demo_$(METHOD)
endif
ifneq ($(filter demo,$(MAKECMDGOALS)),)
ifeq ($(wildcard $(DEMO_CONFIG)),)
$(error METHOD=$(METHOD) has no demo recipe $(DEMO_CONFIG); use METHOD=twist or METHOD=self_classifier)
endif
endif
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# FFCV builds from source against OpenCV and libjpeg-turbo, found through pkg-config (see README, "FFCV").
FFCV_APT := pkg-config libopencv-dev libturbojpeg0-dev

.PHONY: demo test install data clean sysdeps gpu-check

$(BIN)/python:
	$(PY) -m venv $(VENV)

# System packages FFCV's build needs: checked in milliseconds when present, installed with apt otherwise.
sysdeps:
	@pkg-config --exists opencv4 libturbojpeg 2>/dev/null || \
	 { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] || \
	   { echo "FFCV needs system packages: sudo apt-get install $(FFCV_APT)" >&2; exit 1; }; \
	   apt-get install -y -qq --no-install-recommends $(FFCV_APT) >/dev/null 2>&1 || \
	   { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $(FFCV_APT) >/dev/null; }; }

# What `make demo` needs: torch, torchvision and the core dependencies (a couple of minutes from nothing).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# What the test suite exercises besides: FFCV (built from source, needs sysdeps) and NVIDIA DALI (~290 MB of
# wheels; its tests run on the CPU) and TensorBoard (train.tensorboard=true).
$(VENV)/.installed-extras: $(VENV)/.installed | sysdeps
	$(BIN)/pip install -q -e ".[dev,ffcv,dali,tensorboard]"
	touch $@

install: $(VENV)/.installed

# The demo's images come from Debian's dataset-fashion-mnist; without apt (or root) demo_data.py falls back to
# scikit-image's bundled photos.
$(FMNIST):
	-(command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)))

data: install $(FMNIST)
	$(BIN)/python tools/demo_data.py $(DEMO_DATA)

demo: data
	$(BIN)/python train.py --config $(DEMO_CONFIG) --resume auto data.path=$(DEMO_DATA) train.out_dir=$(DEMO_RUN)
	$(BIN)/python evaluate.py knn,cluster,linear --cached-features --baseline init,pixels \
		--checkpoint $(DEMO_RUN)/checkpoint.pt --gallery $(DEMO_RUN)/clusters.png data.path=$(DEMO_DATA)
	$(BIN)/python tools/plot_run.py $(DEMO_RUN)

test: $(VENV)/.installed-extras $(FMNIST)
	$(BIN)/python -m pytest -q

# The one-shot device check: runs from a plain checkout with the machine's own torch/torchvision (>= 2.11/0.26),
# installs nothing, <= 4 minutes on one H200; writes $(GPU_CHECK_OUT)/gpu_check.json and gpu_check.md.
GPU_CHECK_OUT ?= gpu_check_out
gpu-check:
	PYTHONPATH=$(CURDIR) $(PY) tools/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(DEMO_RUN) $(DEMO_DATA)
