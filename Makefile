# The two commands a new user needs (see README): `make up` and `make test`.
.PHONY: setup up test lint typecheck bench

setup:
	bash scripts/setup.sh

up: setup
	.venv/bin/tandem up

test: setup lint typecheck
	.venv/bin/python -m pytest -q -n auto --dist loadgroup

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check shared services kernels tests bench scripts
	.venv/bin/python scripts/gen_protos.py --check

typecheck: setup
	.venv/bin/mypy

bench: setup
	.venv/bin/python bench/offline_throughput.py --json bench/results/offline_cpu.json
