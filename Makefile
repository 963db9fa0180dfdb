# hosm-lightning: `make test` and `make demo` are the two commands (see README).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: test demo install clean

install: $(STAMP)

# (Re)install when the venv is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# pytest exits 5 when it collected no tests; make treats any non-zero exit as failure.
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(BIN)/python -m hosm_lightning.demo

clean:
	rm -rf $(VENV) lightning_logs runs outputs
