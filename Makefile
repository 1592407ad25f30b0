# Quick start:  make demo   (venv + install + demo dataset + train + evaluate)
#               make test   (venv + install + test suite; what CI runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/demo
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install data clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The `dali` extra (NVIDIA DALI, ~290 MB of wheels, ~30 s) is part of the test install: its tests run on CPU.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev,dali]"
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
	$(BIN)/python train.py --config configs/demo.yaml --resume auto data.path=$(DEMO_DATA) train.out_dir=$(DEMO_RUN)
	$(BIN)/python evaluate.py knn,cluster --checkpoint $(DEMO_RUN)/checkpoint.pt data.path=$(DEMO_DATA)

test: install $(FMNIST)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO_RUN) $(DEMO_DATA)
