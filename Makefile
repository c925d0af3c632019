# The two commands of the README: `make run` and `make test`.
# Each installs what it needs first (a virtualenv in .venv, pinned by
# constraints.txt) and makes sure RabbitMQ answers on 127.0.0.1:5672.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Arguments for scs-agent, e.g. make run ARGS=":8001 -i agent1 -D /tmp/agent1"
ARGS ?=
# Arguments for pytest, e.g. make test PYTEST_ARGS="tests/test_api.py -x"
PYTEST_ARGS ?=

.PHONY: run test lint install system-packages rabbitmq clean

$(BIN)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	# compat mode: the flat twisted/plugins layout stays visible to twistd
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]' \
		--config-settings editable_mode=compat
	touch $@

install: system-packages $(BIN)/.installed

system-packages:
	scripts/ensure-system-packages $(SYSTEM_PACKAGES)

rabbitmq:
	scripts/ensure-rabbitmq

run: install rabbitmq
	$(BIN)/scs-agent $(ARGS)

# The linter and formatter first (ruff.toml): the tree stays clean under them.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: SYSTEM_PACKAGES = chromium
test: install lint rabbitmq
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
