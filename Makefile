# Two commands: `make demo` and `make test`. Everything else they need, they set up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean system-deps test-deploy

$(STAMP): pyproject.toml
	@# Debian's python3 ships without venv/ensurepip until python3-venv is installed.
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
	  && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# PostgreSQL (tests start their own server), pebble (a real ACME server), NSD (a parent zone
# for doctor's delegation check), Chromium (the console's browser tests), dig, git, curl and
# openssl (real clients in tests), when missing; kubectl, gh and skopeo too, where they install.
system-deps:
	@if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	   || ! command -v dig >/dev/null 2>&1 || ! command -v git >/dev/null 2>&1 \
	   || ! command -v curl >/dev/null 2>&1 || ! command -v pebble >/dev/null 2>&1 \
	   || ! command -v openssl >/dev/null 2>&1 || ! { command -v nsd || ls /usr/sbin/nsd; } >/dev/null 2>&1 \
	   || ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      postgresql bind9-dnsutils git curl pebble openssl nsd chromium >/dev/null; \
	  else echo "install postgresql, bind9-dnsutils, git, curl, pebble, openssl, nsd and chromium (needs root and apt-get)"; fi; \
	fi
	@if ! command -v kubectl >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null \
	    || echo "kubernetes-client did not install: the kubectl test is skipped"; \
	fi
	@for tool in gh skopeo; do \
	  if ! command -v $$tool >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$tool >/dev/null \
	      || echo "$$tool did not install: its test is skipped"; \
	  fi; \
	done

demo: $(STAMP)
	$(PY) deploy/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) system-deps lint
	$(VENV)/bin/pytest --cov=store --cov=canaries --cov=listeners --cov=alerts --cov=oobwatch --cov-report=term

# The image (deploy/Containerfile) and deploy/compose.yaml end to end under podman: needs root
# for apt-get and podman; caches a debootstrap base in /var/cache/oobwatch-deploy.
test-deploy: $(STAMP)
	$(PY) deploy/test/deploy_test.py

bench: $(STAMP)
	@if ! command -v dnsperf >/dev/null 2>&1 || ! command -v nsd >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsperf nsd >/dev/null; \
	fi
	$(PY) bench/dnsbench.py
	$(PY) bench/amplification.py
	$(PY) bench/latency.py
	$(PY) bench/hostile.py
	$(PY) bench/timeline.py
	$(PY) bench/cli.py
	$(PY) bench/tls.py
	$(PY) bench/console.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage artifacts
