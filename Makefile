# The two commands of the README: `make run` and `make test`.
# Each installs what it needs first (a virtualenv in .venv, pinned by
# constraints.txt) and makes sure RabbitMQ answers on 127.0.0.1:5672.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Arguments for scs-agent, e.g. make run ARGS=":8001 -i agent1 -D $HOME/scs-data/agent1"
ARGS ?=
# Arguments for pytest, e.g. make test PYTEST_ARGS="tests/test_api.py -x"
PYTEST_ARGS ?=

.PHONY: run test lint install system-packages rabbitmq clean

# pip -q still shows pip's warnings, not the build's own output: that
# building this project prints no warning is a test of its own
# (tests/integration/test_cli_usability.py).
$(BIN)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: system-packages $(BIN)/.installed

system-packages:
	scripts/ensure-system-packages $(SYSTEM_PACKAGES)

rabbitmq:
	scripts/ensure-rabbitmq

# The agent gets the terminal to itself (scripts/run-in-foreground): Ctrl-C
# reaches it alone, it stops its workers and exits 0, and so does make.
run: install rabbitmq
	$(BIN)/python scripts/run-in-foreground $(BIN)/scs-agent $(ARGS)

# The linter and formatter first (ruff.toml): the tree stays clean under them.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: SYSTEM_PACKAGES = chromium
test: install lint rabbitmq
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
