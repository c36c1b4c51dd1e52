#!/usr/bin/env bash
# Set up whatever is missing to run panoptic_segformer, then optionally run a command in that
# environment. Idempotent: when everything is present it only checks (a few seconds).
#
#   scripts/setup.sh                   set up, print the environment report
#   scripts/setup.sh -- CMD [ARGS...]  set up, then run CMD with the environment's bin/ first on PATH
#
# Which Python: $PSF_VENV if set (created when missing); else the active virtualenv or conda
# environment; else ./.venv in the repository (created when missing).
# What it installs when missing, in this order:
#   1. PyTorch + torchvision            ($TORCH_SPEC, default "torch torchvision")
#   2. Detectron2, from the first of: an already-installed copy; the source folder $DETECTRON2_SRC;
#      ../shared/vendor/detectron2-src.tar.gz (an unmodified snapshot of the official source, for
#      machines that cannot reach GitHub); the official git URL
#   3. panopticapi-lite (--no-deps: its metadata pins numpy<2)
#   4. this project with its demo, export and test extras (editable), which builds the op
#      panoptic_segformer._C; rebuilt when a C++/CUDA source or setup.py is newer than it
# Build variables (README "Install"): FORCE_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

say() { printf '== %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- the Python environment
if [ -n "${PSF_VENV:-}" ]; then
  VENV="$PSF_VENV"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  VENV="$VIRTUAL_ENV"
elif [ -n "${CONDA_PREFIX:-}" ]; then
  VENV="$CONDA_PREFIX"
else
  VENV="$REPO/.venv"
fi
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  say "creating virtual environment $VENV"
  "${PYTHON:-python3}" -m venv "$VENV" || die "could not create a venv with ${PYTHON:-python3} (install python3-venv, or set PSF_VENV/PYTHON)"
  "$PY" -m pip install -q --upgrade pip
fi
PIP=("$PY" -m pip install --disable-pip-version-check)
export PATH="$VENV/bin:$PATH"

# is a module installed (found without importing it, so the check stays fast)
has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# ---------------------------------------------------------------- 1. PyTorch
if ! has torch || ! has torchvision; then
  say "installing PyTorch: pip install ${TORCH_SPEC:-torch torchvision}"
  # shellcheck disable=SC2086  (TORCH_SPEC is a list of requirement specifiers)
  "${PIP[@]}" ${TORCH_SPEC:-torch torchvision}
fi

# ---------------------------------------------------------------- 2. Detectron2
# Its own build must not inherit FORCE_CUDA / TORCH_CUDA_ARCH_LIST meant for our op: on a
# machine without a GPU that would compile all of Detectron2's CUDA kernels (tens of minutes),
# and the project uses none of them.
install_detectron2() {
  env -u FORCE_CUDA -u TORCH_CUDA_ARCH_LIST "${PIP[@]}" -q --no-build-isolation "$1"
}
VENDORED="$REPO/../shared/vendor/detectron2-src.tar.gz"
D2_SOURCE=""  # empty: already installed (the report then says where pip got it from)
if has detectron2; then
  say "Detectron2: already installed"
elif [ -n "${DETECTRON2_SRC:-}" ]; then
  [ -f "$DETECTRON2_SRC/setup.py" ] || die "DETECTRON2_SRC=$DETECTRON2_SRC has no setup.py"
  say "installing Detectron2 from DETECTRON2_SRC=$DETECTRON2_SRC (about 1.5 minutes on 2 cores)"
  install_detectron2 "$DETECTRON2_SRC"
  D2_SOURCE="DETECTRON2_SRC=$DETECTRON2_SRC"
elif [ -f "$VENDORED" ]; then
  say "installing Detectron2 from the vendored snapshot $(cd "$(dirname "$VENDORED")" && pwd)/$(basename "$VENDORED") (about 1.5 minutes on 2 cores)"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  tar -xzf "$VENDORED" -C "$tmp"
  install_detectron2 "$tmp/detectron2"
  rm -rf "$tmp"
  trap - EXIT
  D2_SOURCE="vendored snapshot ../shared/vendor/detectron2-src.tar.gz"
else
  say "installing Detectron2 from https://github.com/facebookresearch/detectron2 (about 1.5 minutes on 2 cores)"
  install_detectron2 "git+https://github.com/facebookresearch/detectron2.git"
  D2_SOURCE="git+https://github.com/facebookresearch/detectron2.git"
fi
has detectron2 || die "Detectron2 is still not importable after installing it ($D2_SOURCE)"

# ---------------------------------------------------------------- 3. panopticapi
if ! has panopticapi.evaluation; then
  say "installing panopticapi-lite (--no-deps)"
  "${PIP[@]}" -q --no-deps panopticapi-lite
fi

# ---------------------------------------------------------------- 4. the project and its op
# Up to date when: installed editable from this folder, the extras import, and the op is newer
# than every C++/CUDA source and setup.py (and has the CUDA kernels when FORCE_CUDA=1).
project_ready() {
  "$PY" - "$REPO" <<'PYEOF' >/dev/null 2>&1
import glob, importlib.util, os, sys
repo = sys.argv[1]
import importlib.metadata, json, urllib.parse
# installed (editable) from this folder, not just importable from the current directory
url = json.loads(importlib.metadata.distribution("panoptic_segformer").read_text("direct_url.json"))
assert os.path.realpath(urllib.parse.urlparse(url["url"]).path) == os.path.realpath(repo)
for mod in ("cv2", "tqdm", "matplotlib", "pytest", "onnx", "onnxruntime", "onnxscript"):
    assert importlib.util.find_spec(mod) is not None, mod
so = glob.glob(os.path.join(repo, "panoptic_segformer", "_C*.so"))
assert so
csrc = glob.glob(os.path.join(repo, "panoptic_segformer", "layers", "csrc", "**", "*.*"), recursive=True)
assert os.path.getmtime(so[0]) >= max(os.path.getmtime(p) for p in csrc + [os.path.join(repo, "setup.py")])
if os.environ.get("FORCE_CUDA") == "1":
    import torch  # noqa: F401  (the extension links against libtorch)
    from panoptic_segformer import _C
    assert _C.cuda_compiled()
PYEOF
}
if ! project_ready; then
  say "installing this project (pip install --no-build-isolation -e '.[demo,export,test]'; builds the op)"
  start=$(date +%s)
  rm -rf "$REPO/build" "$REPO"/panoptic_segformer/_C*.so
  "${PIP[@]}" -q --no-build-isolation -e ".[demo,export,test]"
  say "project install + op build took $(( $(date +%s) - start )) s"
  project_ready || die "the project or its op is not usable after installing (see the build output above)"
fi

# ---------------------------------------------------------------- environment report
"$PY" -W ignore::FutureWarning -m panoptic_segformer.env_info ${D2_SOURCE:+--detectron2-source "$D2_SOURCE"}

if [ "${1:-}" = "--" ]; then
  shift
  [ $# -gt 0 ] || die "nothing to run after --"
  exec "$@"
elif [ $# -gt 0 ]; then
  die "unknown argument $1 (usage: scripts/setup.sh [-- CMD ARGS...])"
fi
