# The two commands (README): `make run` (main job) and `make test`. Both bootstrap first.
PY := .venv/bin/python

.PHONY: setup run test bench
setup:
	bash scripts/bootstrap.sh

run: setup
	$(PY) scripts/oboro-main $(ARGS)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup

bench: setup
	$(PY) bench/forward_vs_nextdit.py
