# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all clean

# torch and torchvision come from the package registry: the CUDA build also runs on CPU-only
# machines. torchvision pins its exact torch, which keeps pip off any CPU-only torch wheel
# (that one cannot import torchvision). The first install downloads ~3 GB, about a minute.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "import torch, torchvision, onnx, onnxruntime; print('installed torch', torch.__version__, '| torchvision', torchvision.__version__, '| onnxruntime', onnxruntime.__version__)"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/unet-export demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:logging

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:logging -m "not gpu and not tensorrt"

clean:
	rm -rf $(VENV) exports build *.egg-info
