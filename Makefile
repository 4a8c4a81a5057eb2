# pawcam: the two fresh-machine commands are `make run` and `make test` (each sets itself up).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# What `make run` classifies, and where the results go.
DATA   ?= ../shared/dataset/test
OUT    ?= results

.PHONY: setup run test bench bench-watcher bench-web bench-ray soak train evaluate export figures clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[train,dev,web,ray]"
	touch $@

run: setup            ## classify every photo under DATA into OUT/predictions.csv + OUT/gradcam/
	@test -e "$(DATA)" || { echo "make run: $(DATA) not found; name your photos: make run DATA=/path/to/photos" >&2; exit 2; }
	$(BIN)/pawcam predict "$(DATA)" --recursive --out "$(OUT)"

test: setup           ## the whole test suite
	$(BIN)/python -m pytest -q

bench: setup          ## engine throughput figures quoted in README.md
	$(BIN)/python benchmarks/bench_engine.py

bench-watcher: setup  ## daemon latency/throughput figures quoted in README.md
	$(BIN)/python benchmarks/bench_watcher.py

bench-web: setup      ## web app page loads over 1,000,000 indexed rows, quoted in README.md
	$(BIN)/python benchmarks/bench_web.py

bench-ray: setup      ## Ray run vs local run on the same photos (ratio quoted in README.md)
	nice $(BIN)/python benchmarks/bench_ray.py

soak: setup           ## chaos soak of the daemon (kills, full disk, removed inbox, SIGHUP); by hand
	$(BIN)/python benchmarks/soak_watcher.py

train: setup          ## retrain the shipped model on ../shared/dataset + ../shared/dataset-extra
	$(BIN)/pawcam train --data ../shared/dataset --data ../shared/dataset-extra

export: setup         ## regenerate the shipped model's ONNX copies (fp32, int8) and their checks
	$(BIN)/pawcam export --data ../shared/dataset --data ../shared/dataset-extra

# The README's side-by-side figure of the explanation methods: three cats on a blanket, two
# puppies in a box, a small dog far away on a lawn, a small cat on a cat tree.
FIGURE_PHOTOS = $(addprefix ../shared/dataset/test/,cat/cat.4050.jpg dog/dog.4018.jpg \
                dog/dog.4021.jpg cat/cat.4042.jpg)
figures: setup        ## models/cam_methods.jpg: each photo and each method's overlay
	$(BIN)/python -m training.explanations --out models/cam_methods.jpg $(FIGURE_PHOTOS)

evaluate: setup       ## evaluate the shipped model on ../shared/dataset/test
	$(BIN)/pawcam evaluate --data ../shared/dataset

clean:
	rm -rf $(VENV) results .pytest_cache
