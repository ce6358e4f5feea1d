# make test  : create .venv if missing, install the project with its test extra,
#              then ruff, mypy --strict on proxy/, and the whole pytest suite.
# make demo  : create .venv if missing and run the quick-start demo.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint typecheck pytest demo venv clean certs sslyze bytecode

venv: $(STAMP)

# pip shows its own progress on a terminal and stays quiet in logs (CI, pipes).
$(STAMP): pyproject.toml
	@echo "installing dependencies into $(VENV) (first run takes about a minute)..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if test -t 1; then quiet=; else quiet=--quiet; fi; \
	$(BIN)/python -m pip install $$quiet --upgrade pip && \
	$(BIN)/python -m pip install $$quiet -e '.[test]'
	@touch $(STAMP)

# An editable install leaves proxy/ without bytecode, and where
# PYTHONDONTWRITEBYTECODE is set (CI images, this one) every agent-proxy start
# would compile its ~90 modules from source again: about 0.25 s of each
# start-up, and the suite starts hundreds. compileall writes what changed.
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q -j0 proxy >/dev/null

# sslyze (the TLS scanner of tests/integration/test_tls_sslyze.py) pins an
# older cryptography than ours, so it gets a tool venv of its own.
SSLYZE := $(VENV)/tools/sslyze
sslyze: $(SSLYZE)/.installed
$(SSLYZE)/.installed:
	@echo "installing sslyze into $(SSLYZE)..."
	@test -x $(SSLYZE)/bin/python || $(PYTHON) -m venv $(SSLYZE)
	@if test -t 1; then quiet=; else quiet=--quiet; fi; \
	$(SSLYZE)/bin/python -m pip install $$quiet 'sslyze>=6.3,<7'
	@touch $@

lint: $(STAMP)
	$(BIN)/ruff check proxy tests $(wildcard benchmarks)
	$(BIN)/ruff format --check proxy tests $(wildcard benchmarks)

typecheck: $(STAMP)
	$(BIN)/mypy --strict proxy $(wildcard benchmarks)

pytest: $(STAMP) $(SSLYZE)/.installed bytecode
	$(BIN)/pytest -q

test: lint typecheck pytest

demo: $(STAMP) bytecode
	$(BIN)/python -m proxy.demo

# make certs : the dev PKI into certs/ (dev CA, the cast's SVIDs, the
#              brownfield bank's CA and certificates); see certs/README.md.
certs: $(STAMP)
	$(BIN)/python -m proxy.credentials.certs certs

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# make bench       : the full benchmark (3 repetitions x 10 s cells, about 30 minutes);
#                    writes benchmarks/results/latest.md and latest.png.
# make bench-quick : the same rows in about 2 minutes (1 repetition x 2 s cells);
#                    writes benchmarks/results/quick.md and quick.png (untracked).
# Both install the bench extra (matplotlib) and any missing Debian peers.
.PHONY: bench bench-quick
bench: $(STAMP) bytecode
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP) bytecode
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.run --quick

# make fuzz : the fuzz harnesses of tests/fuzz (every parser of outside input)
#             and the llhttp-vs-h11 differential test, with many random examples;
#             FUZZ_EXAMPLES=N per harness (default 5000). make test runs the same
#             briefly (smoke profile).
.PHONY: fuzz
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/pytest -q tests/fuzz tests/unit/test_llhttp_differential.py
