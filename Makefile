# `make demo` and `make test` set everything up on a machine with Python 3.11, pip and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup test demo data clean-venv orthanc system-deps pretrain

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m tools.demo

# The shipped model: generated data only (bundle/configs/pretrain.json), seeded and resumable (run it
# again after an interruption), then exported to bundle/models/model.pt (fp16) + model.json.
PRETRAIN_CASES ?= 400
PRETRAIN_SEED  ?= 1
PRETRAIN_DATA  ?= data/pretrain
pretrain: $(STAMP)
	test -f $(PRETRAIN_DATA)/.complete || ($(PY) -m custom.synthetic --out $(PRETRAIN_DATA) --cases $(PRETRAIN_CASES) \
		--seed $(PRETRAIN_SEED) --layout brats2021 --size medium --workers 2 -q && touch $(PRETRAIN_DATA)/.complete)
	$(PY) -m monai.bundle run training --meta_file bundle/configs/metadata.json --logging_file bundle/configs/logging.conf \
		--config_file "['bundle/configs/train.json','bundle/configs/pretrain.json']" --dataset_dir $(PRETRAIN_DATA) --resume true
	$(PY) -m tools.export_weights --checkpoint runs/pretrain/models/model.pt --out bundle/models/model.pt --command "make pretrain" \
		--note "generated data only: custom.synthetic seed $(PRETRAIN_SEED), $(PRETRAIN_CASES) cases, 2 mm"

clean-venv:
	rm -rf $(VENV)

# Debian packages of the DICOMweb / OHIF tests (Orthanc + its DICOMweb plugin, Chromium). The tests
# install them themselves when missing (as root); this does it up front.
SYSTEM_DEPS := orthanc orthanc-dicomweb chromium
system-deps:
	apt-get install -y --no-install-recommends $(SYSTEM_DEPS) || (apt-get update && apt-get install -y --no-install-recommends $(SYSTEM_DEPS))

# The project's Orthanc (monailabel_app/orthanc/orthanc.json) in the foreground, DICOMweb at
# http://127.0.0.1:$(ORTHANC_PORT)/dicom-web; Ctrl-C stops it. ORTHANC_STORAGE=DIR keeps the database.
ORTHANC_PORT ?= 8042
orthanc: $(STAMP)
	$(PY) -m devtools.orthanc --port $(ORTHANC_PORT) $(if $(ORTHANC_STORAGE),--storage $(ORTHANC_STORAGE))
