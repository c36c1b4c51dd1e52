# Two commands on a fresh machine (README "Quick start"); each first sets up whatever is missing
# (scripts/setup.sh: PyTorch, Detectron2, panopticapi-lite, this project and its op).
#   make quickstart   train a small model on generated toy data, evaluate PQ, draw results
#                     (STYLE=hard: on the hard toy data, whose things only their shape tells apart)
#   make test         run the test suite (ARGS="-k deform" to select tests)
#   make setup        only set up, and print the environment report
# Environment: PSF_VENV, DETECTRON2_SRC, TORCH_SPEC, FORCE_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST,
# MAX_JOBS (see scripts/setup.sh).
.PHONY: setup test quickstart clean

setup:
	scripts/setup.sh

test:
	scripts/setup.sh -- python -m pytest -q tests $(ARGS)

quickstart:
	scripts/setup.sh -- scripts/quickstart.sh $(STYLE)

clean:
	rm -rf build panoptic_segformer/_C*.so
