# weakcell — every stage of the pipeline is a target. `make help` lists them.
# Config: CONFIG=configs/x.yaml, overrides: ARGS="key=value ...", redo finished work: FORCE=1.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CONFIG ?= configs/demo.yaml
ARGS ?=
FORCE ?=
# RUN=<name> picks a run (name=<name>), e.g. make weights-dataset RUN=demo
RUN ?=
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OVERRIDES := $(if $(RUN),name=$(RUN)) $(ARGS) $(if $(FORCE),force=true)
WEAKCELL := $(PY) -m weakcell
# tcmalloc makes the many small allocations of image work cheaper, when the system has it.
TCMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4))
export LD_PRELOAD := $(TCMALLOC)
SHARED ?= ../shared/data
space := $(subst ,, )

.PHONY: help install init check keys demo data preview folds folds-hpa2021 cache cache-merge preview-cells train image-model refine thresholds infer infer-hpa2021 evaluate score ablate \
	bench-lineage bench-synthetic bench-demo-speed bench-cache bench-segment-backends bench-segment-gpu bench-train bench-thresholds bench-mil-shift bench-mil-gate bench-confidence bench-metric bench-kaggle bench-hpa2018 bench-image-model bench-train-gpu bench-pipeline-gpu test test-all lint clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'
	@echo; echo "  CONFIG=$(CONFIG)  ARGS=\"key=value ...\"  FORCE=1 redoes finished work"

$(STAMP): pyproject.toml requirements/constraints.txt
	tools/need-disk 8 $(VENV) "$(VENV) (torch with its CUDA libraries: about 6.5 GiB)"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -c requirements/constraints.txt -e '.[dev,segment,kaggle,external,numba]'
	touch $@

install: $(STAMP) ## build .venv with every dependency pinned (requirements/constraints.txt)

# A replica of Kaggle's Python image (its Python and versions, requirements/kaggle-image.txt): the offline
# kernel tests run every kernel in it. Never holds weakcell: kernels install it from the wheels dataset.
KAGGLE_PYTHON_VERSION ?= 3.12
KAGGLE_VENV ?= .venv-kaggle
KAGGLE_STAMP := $(KAGGLE_VENV)/.installed
# the fast suite in the Kaggle image: weakcell (editable) + what the image lacks, at this repo's pins
KAGGLE_TEST_VENV ?= .venv-kaggle-test
KAGGLE_TEST_STAMP := $(KAGGLE_TEST_VENV)/.installed
KAGGLE_LACKS := iterative-stratification cellpose fastremap fill_voids roifile imagecodecs

$(KAGGLE_STAMP): requirements/kaggle-image.txt tools/find-python
	rm -rf $(KAGGLE_VENV)
	tools/need-disk 9 $(KAGGLE_VENV) "$(KAGGLE_VENV) (Kaggle's image replica: about 7.8 GiB)"
	python=$$(tools/find-python $(KAGGLE_PYTHON_VERSION)) && "$$python" -m venv $(KAGGLE_VENV)
	$(KAGGLE_VENV)/bin/pip install -q -r requirements/kaggle-image.txt
	touch $@

kaggle-env: $(KAGGLE_STAMP) ## build .venv-kaggle: Kaggle's image replica (Python 3.12, requirements/kaggle-image.txt)

$(KAGGLE_TEST_STAMP): $(KAGGLE_STAMP) pyproject.toml requirements/constraints.txt
	rm -rf $(KAGGLE_TEST_VENV)
	$(KAGGLE_VENV)/bin/python -m venv --without-pip $(KAGGLE_TEST_VENV)
	$(KAGGLE_TEST_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $(KAGGLE_TEST_VENV)/.purelib
	$(KAGGLE_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$$(cat $(KAGGLE_TEST_VENV)/.purelib)/kaggle_image.pth"
	$(KAGGLE_TEST_VENV)/bin/python -m pip install -q --no-deps -e . \
		$$(grep -iE '^($(subst $(space),|,$(KAGGLE_LACKS)))==' requirements/constraints.txt)
	$(KAGGLE_TEST_VENV)/bin/python -m pip check
	touch $@

test-kaggle: $(KAGGLE_TEST_STAMP) ## the fast test suite in Kaggle's image replica (+ weakcell and what the image lacks); PYTEST_ARGS=...
	$(KAGGLE_TEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# make init PROJECT=~/hpa [TEMPLATE=hpa2018] ARGS="data.dir=..." writes ~/hpa/weakcell.yaml; then CONFIG=~/hpa/weakcell.yaml
TEMPLATE ?= hpa2021
PROJECT ?=
init: $(STAMP) ## one config for a project: PROJECT=<dir> [TEMPLATE=hpa2021|hpa2018|competition] ARGS="data.dir=..." -> <dir>/weakcell.yaml
	$(WEAKCELL) init $(TEMPLATE) $(or $(PROJECT),$(error give PROJECT=<folder for the project's outputs>)) $(ARGS)

check: $(STAMP) ## data layout, segmentation backend, weights files, run / weights dataset / kernel agreement of CONFIG
	$(WEAKCELL) check $(CONFIG) $(OVERRIDES)

keys: $(STAMP) ## every config key with its default and what it does (ARGS=train. for one section)
	$(WEAKCELL) keys $(ARGS)

demo: $(STAMP) ## the main job on the embedded synthetic benchmark: data preview folds cache train refine thresholds infer evaluate, in one process
	$(WEAKCELL) demo $(CONFIG) $(OVERRIDES)

data: $(STAMP) ## generate the synthetic HPA benchmark into data/synthetic/
	$(WEAKCELL) data $(CONFIG) $(OVERRIDES)

preview: $(STAMP) ## montage of the synthetic set -> reports/preview_<dataset>.png (synthetic: 2021, synthetic2018)
	$(WEAKCELL) preview $(CONFIG) $(OVERRIDES)

folds: $(STAMP) ## multilabel-stratified K folds -> folds/<dataset>.csv
	$(WEAKCELL) folds $(CONFIG) $(OVERRIDES)

folds-hpa2021: $(STAMP) ## check the committed folds/hpa2021.csv (and its record) against ../shared/data/hpa2021/train.csv; other settings get their own file
	$(WEAKCELL) folds configs/hpa2021.yaml data.dir=$(SHARED)/hpa2021 $(OVERRIDES)

cache: $(STAMP) ## segment every image, cache cell crops -> cache/<dataset>/<backend>/ (--shard-index/--num-shards via ARGS)
	$(WEAKCELL) cache $(CONFIG) $(OVERRIDES)

cache-merge: $(STAMP) ## join the part indexes of a cache built in --num-shards parts
	$(WEAKCELL) cache-merge $(CONFIG) $(OVERRIDES)

preview-cells: $(STAMP) ## outlines on synthetic and real images, a grid of crops -> reports/preview_cells.png
	$(WEAKCELL) preview-cells $(CONFIG) $(OVERRIDES)

train: $(STAMP) ## K folds: cell model on weak labels -> attention MIL -> OOF predictions in runs/<name>/
	$(WEAKCELL) train $(CONFIG) $(OVERRIDES)

image-model: $(STAMP) ## whole-image model (image_model.enabled=true): K folds on downscaled images -> runs/<name>/image_model/ (OOF, metrics.json)
	$(WEAKCELL) image-model $(CONFIG) $(OVERRIDES)

refine: $(STAMP) ## pseudo-label refinement rounds: relabel cells from OOF outputs, retrain -> runs/<name>/round<r>/
	$(WEAKCELL) refine $(CONFIG) $(OVERRIDES)

thresholds: $(STAMP) ## per-class thresholds tuned on OOF image predictions -> runs/<name>/thresholds.json
	$(WEAKCELL) thresholds $(CONFIG) $(OVERRIDES)

infer: $(STAMP) ## TTA x folds on the test split -> submissions/<name>/cell_level.csv + image_level.csv (validated)
	$(WEAKCELL) infer $(CONFIG) $(OVERRIDES)

evaluate: $(STAMP) ## image/cell scores (competition mAP vs truth), per-class plots, attention maps -> reports/<name>/
	$(WEAKCELL) evaluate $(CONFIG) $(OVERRIDES)

infer-hpa2021: $(STAMP) ## the demo run's models on the real images in ../shared/data/hpa2021 -> submissions/hpa2021/ (validated)
	$(WEAKCELL) cache configs/hpa2021.yaml data.dir=$(SHARED)/hpa2021 "cache.splits=[train]" checks.max_missing_share=1 $(OVERRIDES)
	$(WEAKCELL) infer configs/hpa2021.yaml data.dir=$(SHARED)/hpa2021 infer.split=train infer.models=demo $(OVERRIDES)

# make score: any cell-level CSV against a truth folder (synthetic layout); SPLIT= scores every truth image
SUBMISSION ?= submissions/$(or $(RUN),demo)/cell_level.csv
TRUTH ?= data/synthetic/truth
SPLIT ?= test
VERIFIED ?= image
score: $(STAMP) ## the organisers' 2021 metric of SUBMISSION= against TRUTH= (default: the demo's test split); JSON=out.json
	$(WEAKCELL) score $(SUBMISSION) --truth $(TRUTH) --verified $(VERIFIED) $(if $(SPLIT),--split $(SPLIT)) $(if $(JSON),--json $(JSON))

ablate: $(STAMP) ## the ablation grid on the same folds -> reports/leaderboard.md (+ .png); ARGS=ablate.subset=true is quicker
	$(WEAKCELL) ablate $(CONFIG) $(OVERRIDES)

# -- External data (weakcell.external, weakcell.duplicates): README "External data" -------------------
.PHONY: external duplicates bench-duplicates bench-folds bench-external-sizes bench-external

external: $(STAMP) ## public HPA images of external.image_list -> data/<dataset>-external/ (train/, train.csv, sources.csv); ARGS="... --dry-run" first
	$(WEAKCELL) external $(CONFIG) $(OVERRIDES)

# make duplicates: every folder of channel files in DUPLICATE_DIRS, the pairs and clusters into DUPLICATES
DUPLICATE_DIRS ?= $(wildcard data/hpa2021/train data/hpa2021/test data/hpa2021-external/train)
DUPLICATES ?= reports/duplicates.json
duplicates: $(STAMP) ## near-duplicate pairs and clusters of DUPLICATE_DIRS="a/train a/test b/train" -> DUPLICATES=reports/duplicates.json (make folds reads it: folds.duplicates)
	$(WEAKCELL) duplicates $(DUPLICATE_DIRS) --json $(DUPLICATES)

bench-duplicates: $(STAMP) ## hashing speed, pairing of the real images' copies, pair search over 100k hashes -> benchmarks/duplicates.md
	$(PY) benchmarks/bench_duplicates.py

bench-folds: $(STAMP) ## pairs straddling folds, plain vs grouped, on a synthetic set with planted near-duplicates -> benchmarks/folds.md
	$(PY) benchmarks/bench_folds.py

bench-external-sizes: $(STAMP) ## JPEG/PNG bytes of the real images and the dry run's arithmetic for the real lists -> benchmarks/external-sizes.md
	$(PY) benchmarks/bench_external_sizes.py

bench-external: $(STAMP) ## test mAP with and without a synthetic external set (JPEG, 16-bit, other sizes and scale), 3 seeds, paired -> benchmarks/external.md
	$(PY) benchmarks/bench_external.py $(ARGS)

# -- Kaggle (weakcell.kagglekit): README "Run it on Kaggle" -------------------------------------------
.PHONY: download wheels weights weights-dataset pretrained-datasets backbone-dataset kernels submit submit-kernel kaggle-env test-kaggle

download: $(STAMP) ## kaggle competitions download (kaggle.download) into data/<dataset>/, unzipped, resumable
	$(WEAKCELL) download $(CONFIG) $(OVERRIDES)

wheels: $(STAMP) ## Kaggle dataset folder: weakcell wheel + wheels the Kaggle image lacks -> dist/kaggle/weakcell-wheels/
	$(WEAKCELL) wheels $(CONFIG) $(OVERRIDES)

weights-dataset: $(STAMP) ## Kaggle dataset folder of run RUN: weights only, thresholds, config -> dist/kaggle/weakcell-weights-<run>/
	$(WEAKCELL) weights-dataset $(CONFIG) $(OVERRIDES)

weights: $(STAMP) ## pretrained weights of weights.fetch (backbone via timm, Cellpose-SAM, SAM ViT-B) -> weights/ + MANIFEST.json (sha256, source)
	$(WEAKCELL) weights $(CONFIG) $(OVERRIDES)

pretrained-datasets: $(STAMP) ## Kaggle dataset folders of what `make weights` fetched (checked against weights/MANIFEST.json) -> dist/kaggle/
	$(WEAKCELL) pretrained-datasets $(CONFIG) $(OVERRIDES)

backbone-dataset: $(STAMP) ## Kaggle dataset folder of model.pretrained_file for the train kernel -> dist/kaggle/weakcell-backbone-<run>/
	$(WEAKCELL) backbone-dataset $(CONFIG) $(OVERRIDES)

kernels: $(STAMP) ## generate the offline kernels -> kernels/<variant>/ (kernel-metadata.json + script)
	$(WEAKCELL) kernels $(CONFIG) $(OVERRIDES)

submit: $(STAMP) ## 2018: kaggle competitions submit; 2021: kaggle kernels push of kernels/inference + next steps
	$(WEAKCELL) submit $(CONFIG) $(OVERRIDES)

VERSION ?=
submit-kernel: $(STAMP) ## 2021: submit submission.csv of version VERSION=n of the pushed kernel (kaggle competitions submit -k -v)
	$(WEAKCELL) submit-kernel $(CONFIG) $(if $(VERSION),kaggle.kernel_version=$(VERSION)) $(OVERRIDES)

bench-lineage: $(STAMP) ## content hashing speed on real PNGs, the demo's manifest and cache cost -> benchmarks/lineage.md
	$(PY) benchmarks/bench_lineage.py

bench-synthetic: $(STAMP) ## generation speed and label-inheritance error -> benchmarks/synthetic.md
	$(PY) benchmarks/bench_synthetic.py

bench-cache: $(STAMP) ## segmentation quality/speed and crop-reading throughput -> benchmarks/segmentation.md, cache.md
	$(PY) benchmarks/bench_segment.py
	$(PY) benchmarks/bench_cache.py

bench-segment-backends: $(STAMP) ## HPA-Cell-Segmentation's post-processing vs its reference, learned backends by stage and size, batched vs per-image cache (CPU) -> benchmarks/segmentation.md
	$(PY) benchmarks/bench_segment_backends.py

bench-segment-gpu: $(STAMP) ## on a GPU machine: U-Net / Cellpose-SAM throughput by batch size, the batched cache by workers -> benchmarks/segmentation_gpu.md
	$(PY) benchmarks/bench_segment_gpu.py

bench-train: $(STAMP) ## weak vs oracle OOF cell mAP, loader share, memory vs cache size -> benchmarks/train.md
	$(PY) benchmarks/bench_train.py

bench-demo-speed: $(STAMP) ## model-only vs data path vs fit rates of the demo on this CPU, prefetch on/off -> benchmarks/demo-speed.md
	$(PY) benchmarks/bench_demo_speed.py $(ARGS)

bench-mil-shift: $(STAMP) ## in-sample vs held-out stage-1 outputs of a trained run's fold models (the MIL head's input shift) -> benchmarks/mil-shift.md
	$(PY) benchmarks/bench_mil_shift.py --config $(CONFIG)

bench-mil-gate: $(STAMP) ## gated vs plain MIL attention on the same fold backbones: image mAP/F1/ECE and cell scores -> benchmarks/mil-gate.md
	$(PY) benchmarks/bench_mil_gate.py --config $(CONFIG) $(ARGS)

bench-thresholds: $(STAMP) ## cross-fitted image macro-F1 of tuned thresholds vs 0.5 over every trained round -> benchmarks/thresholds.md
	$(PY) benchmarks/bench_thresholds.py

bench-confidence: $(STAMP) ## the cell confidence formula re-tuned under both metric readings, OOF and test -> benchmarks/confidence.md
	$(PY) benchmarks/bench_confidence.py --config $(CONFIG) $(ARGS)

bench-metric: $(STAMP) ## out-of-fold scoring through the competition engine per epoch, and the OOF file's cost -> benchmarks/metric.md
	$(PY) benchmarks/bench_metric.py --config $(CONFIG)

bench-kaggle: $(STAMP) ## the inference kernel's cache + infer per real-size image, 559-image projection -> benchmarks/kaggle.md
	$(PY) benchmarks/bench_kaggle.py

bench-hpa2018: $(STAMP) ## 2018 demo: macro-F1 at 0.5 vs tuned vs a second backbone vs focal / class weights / balanced sampler vs a whole-image model -> benchmarks/hpa2018.md
	$(PY) benchmarks/bench_hpa2018.py $(ARGS)

bench-image-model: $(STAMP) ## the whole-image model x the cell model on the demo's test split: every infer.image_model_rule vs none, paired 95% intervals -> benchmarks/image-model.md
	$(PY) benchmarks/bench_image_model.py --config $(CONFIG) $(ARGS)

bench-train-gpu: $(STAMP) ## on a GPU machine: competition config cells/s, model only vs with the loader
	$(PY) benchmarks/bench_train_gpu.py

bench-pipeline-gpu: $(STAMP) ## on a GPU machine: wall time of each demo stage with train.device=cuda -> benchmarks/pipeline_gpu.md
	$(PY) benchmarks/bench_pipeline_gpu.py train.device=cuda train.workers=6 $(OVERRIDES)

lint: $(STAMP) ## ruff + mypy on the whole package
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests
	$(PY) -m mypy

test: lint $(KAGGLE_STAMP) ## lint, then the fast test suite (the offline kernel tests run in .venv-kaggle)
	WEAKCELL_KAGGLE_PYTHON=$(KAGGLE_VENV)/bin/python $(PY) -m pytest -q

test-all: lint $(KAGGLE_STAMP) ## lint, then every test including the slow ones
	WEAKCELL_KAGGLE_PYTHON=$(KAGGLE_VENV)/bin/python $(PY) -m pytest -q -m ''

clean: ## remove generated data, caches and outputs (keeps .venv and committed folds)
	rm -rf data cache runs preview reports/*.png submissions/*/
