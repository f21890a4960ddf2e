# `make demo` and `make test` set everything up on a machine with Python 3.11, pip and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup test demo data clean-venv orthanc system-deps

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m custom.demo

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
	$(PY) -m custom.orthanc --port $(ORTHANC_PORT) $(if $(ORTHANC_STORAGE),--storage $(ORTHANC_STORAGE))
