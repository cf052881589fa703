# diffrep: `make demo` installs and runs the main job on the embedded default; `make test` runs the tests.
# The virtual environment lives outside the clone, keyed by a hash of the pinned requirements,
# so a second checkout (or CI run) on the same machine reuses it instead of installing 5 GB again.

PYTHON ?= python3.11
VENV_ROOT ?= $(HOME)/.cache/diffrep
PINS := $(shell $(PYTHON) .ci/pins.py)
VENV ?= $(VENV_ROOT)/venv-$(PINS)
PY := $(VENV)/bin/python
DIFFREP := $(VENV)/bin/diffrep

DATASET ?= cifar10
T ?= 90,150,300
B ?= 19,24,30
HEAD ?= linear
CONFIG ?=
EXTRA ?=

# The bundled checkpoint (extract/weights/32x32_small.pt) is `make pretrain` with these settings.
PRETRAIN_STEPS ?= 1100
PRETRAIN_OUT ?= runs/pretrain

.PHONY: install demo demo-full test test-fast bench device-kit extract probe fuse feedback pretrain info clean-venv detect segment

# The venv's name carries the hash of the pins, so an existing one is complete: never redone.
$(VENV)/.pins-installed:
	@echo "creating $(VENV) (first time only: about 2 minutes, 5.8 GB)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "setuptools>=64" wheel
	$(PYTHON) .ci/pins.py --requirements > $(VENV)/requirements.txt
	$(PY) -m pip install --quiet -r $(VENV)/requirements.txt
	touch $@

# Registers this checkout's packages in the shared environment (seconds; no dependencies touched).
install: $(VENV)/.pins-installed
	@$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

info: install
	$(DIFFREP) info --config 256x256_uncond

demo: install
	$(DIFFREP) demo $(EXTRA)

# The same demo with the attention head at the paper's settings (an hour or more on a CPU).
demo-full: install
	$(DIFFREP) demo --full $(EXTRA)

# Text-free pretraining of the bundled configuration on the CIFAR-10 training images (labels unused).
pretrain: install
	$(DIFFREP) pretrain --config 32x32_small --dataset cifar10 --steps $(PRETRAIN_STEPS) --out $(PRETRAIN_OUT) $(EXTRA)

test: install
	$(PY) -m pytest -q $(EXTRA)

test-fast: install
	$(PY) -m pytest -q -m "not e2e" $(EXTRA)

bench: install
	$(PY) -m tests.bench $(EXTRA)

# What tests/bench/device_bench.sh needs on a lent GPU machine, whose Python 3.12 has torch but not zarr and
# cannot reach ../shared: wheels of zarr and its compiled needs at this environment's versions (.whl/),
# and 100 CIFAR-10 test JPEGs a class for the bench's 500x375 images (.device-data/). git ignores both.
DEVICE_WHEELS := zarr numcodecs donfig google-crc32c
device-kit: install
	rm -rf .whl .device-data && mkdir -p .whl .device-data/cifar10-jpg
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$($(PY) -c "import importlib.metadata as m; print(' '.join(n + '==' + m.version(n) for n in '$(DEVICE_WHEELS)'.split()))")
	$(PY) -c "from tests.bench.bench_pipeline import sample_cifar10_test; sample_cifar10_test('.device-data/cifar10-jpg', 100)"
	@ls .whl; du -sh .whl .device-data

extract: install
	$(DIFFREP) extract --dataset $(DATASET) --timesteps $(T) --blocks $(B) $(if $(CONFIG),--config $(CONFIG)) $(EXTRA)

# DifFormer on cached blocks x timesteps (the paper's fusion); T and B as for extract.
fuse: install
	$(DIFFREP) fuse --dataset $(DATASET) --timesteps $(T) --blocks $(B) $(if $(CONFIG),--config $(CONFIG)) $(EXTRA)

# DifFeed through the live backbone, e.g. make feedback DATASET=cifar10 T=150 STRATEGY=bottleneck
STRATEGY ?= bottleneck
feedback: install
	$(DIFFREP) feedback --dataset $(DATASET) --timestep $(T) --strategy $(STRATEGY) $(if $(CONFIG),--config $(CONFIG)) $(EXTRA)

# Mask R-CNN on the diffusion backbone, COCO box and mask AP, e.g. make detect DATASET=pets IMAGE_SIZE=32 EXTRA="--epochs 4"
# (pyramid blocks and timestep through EXTRA, e.g. EXTRA="-b 12,15 -t 25"; CONFIG empty: 32x32_small)
IMAGE_SIZE ?= 64
detect: install
	$(DIFFREP) detect --dataset $(DATASET) --image-size $(IMAGE_SIZE) $(if $(CONFIG),--config $(CONFIG)) $(EXTRA)

probe: install
	$(DIFFREP) probe --dataset $(DATASET) --timesteps $(T) --blocks $(B) --head $(HEAD) $(if $(CONFIG),--config $(CONFIG)) $(EXTRA)

clean-venv:
	rm -rf $(VENV)

# Semantic segmentation on unpooled cached block maps, e.g.
#   make segment DATASET=camvid CONFIG=32x32_small T=25 B=8 SEG_HEAD=upernet EXTRA="--image-size 64 --checkpoint extract/weights/32x32_small.pt"
SEG_HEAD ?= pixel
segment: install
	$(DIFFREP) segment --dataset $(DATASET) --timesteps $(T) --blocks $(B) --head $(SEG_HEAD) $(if $(CONFIG),--config $(CONFIG)) $(EXTRA)
