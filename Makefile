# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_KEY := gwk_demo_local-only-demo-key-not-for-production

# make image [IMAGE=registry.example.com/gateway-extproc:0.1.0] [BASE=python-image@sha256:...]
IMAGE ?= gateway-extproc:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
CONTAINER_CLI ?= $(shell command -v docker || command -v podman)

.PHONY: help run test render envoy-config envoy-protos chart-readme image bench clean
.DEFAULT_GOAL := help

## List the targets.
help:
	@awk '/^## /{doc = substr($$0, 4); next} /^[a-z][a-z-]*:/ && doc {split($$1, t, ":"); printf "  make %-13s %s\n", t[1], doc} {doc = ""}' $(MAKEFILE_LIST)

# `make run` installs the gateway, the Helm engine it renders with, and what the README's
# examples import (the demo extra); CI checks that this alone is enough (.ci/run).
$(BIN)/gateway-extproc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[render,demo]'
	touch $@

$(VENV)/.test-deps: $(BIN)/gateway-extproc
	$(BIN)/pip install -q -e '.[test]'
	touch $@

## Start the mock providers, the ext_proc and Envoy on http://localhost:8080 (Ctrl-C stops them all).
run: $(BIN)/gateway-extproc
	@echo "Demo API key (local use only): $(DEMO_KEY)"
	@echo "First call, from another terminal once the gateway is up:"
	@echo "  .venv/bin/python -c 'from openai import OpenAI; c = OpenAI(base_url=\"http://localhost:8080/v1\", api_key=\"$(DEMO_KEY)\"); print(c.chat.completions.create(model=\"default-chat\", messages=[{\"role\": \"user\", \"content\": \"Hello\"}]).choices[0].message.content)'"
	@echo '  (the streamed httpx version is in README.md, "The first call")'
	@echo "mTLS on https://localhost:8443 (throwaway certs in run/certs, client = spiffe://demo.local/ns/demo/sa/app):"
	@echo "  curl --cert run/certs/client.crt --key run/certs/client.key --cacert run/certs/ca.crt https://localhost:8443/v1/models"
	@echo "OIDC: curl -H \"Authorization: Bearer \$$($(BIN)/gateway-extproc dev-token --sub alice --team demo)\" http://localhost:8080/v1/usage"
	@echo "Key admin API on 127.0.0.1:9190, admin token gwa_local-only-admin-token (README.md, \"Identity\")"
	$(BIN)/gateway-extproc local --values helm/values-local.yaml --values helm/values-local-identity.yaml \
		--workdir run --mtls-port 8443

## Install test needs and run every test (pytest exit 5, "no tests", fails the target).
test: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q tests

## Render envoy.yaml + gateway.yaml for the local values into run/.
render: $(BIN)/gateway-extproc
	$(BIN)/gateway-extproc render --values helm/values-local.yaml --out run

## Refresh envoy/ (the render of the chart defaults, for Envoy outside Kubernetes).
envoy-config: $(BIN)/gateway-extproc
	$(BIN)/gateway-extproc render --out envoy

## Refresh gateway_extproc/_proto (Envoy's ext_proc messages, copied from the xds-protos wheel).
envoy-protos: $(BIN)/gateway-extproc
	$(BIN)/python proto/vendor_envoy.py

## Refresh helm/gateway-extproc/README.md (the values reference, from values.yaml's comments).
chart-readme: $(BIN)/gateway-extproc
	$(BIN)/python helm/chart_readme.py

## Build the ext_proc image (Containerfile) with docker or podman.
image:
	@test -n "$(CONTAINER_CLI)" || { echo "make image needs docker or podman" >&2; exit 1; }
	$(CONTAINER_CLI) build -f Containerfile $(if $(BASE),--build-arg BASE=$(BASE)) -t $(IMAGE) .

## Plain Envoy vs the gateway path, same run (needs wrk and nginx: see bench/README.md).
bench: $(VENV)/.test-deps
	$(BIN)/python bench/run.py

## Remove run/ and build output (keeps .venv).
clean:
	rm -rf run build *.egg-info
