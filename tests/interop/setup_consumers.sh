#!/usr/bin/env bash
# The real consumers of `qvl format export`, each in its own virtualenv, for tests/interop:
#   $QVL_INTEROP_DIR/swift  ms-swift==4.6.0 + qwen-vl-utils + decord (ms-swift needs them for Qwen2-VL
#                           and does not declare them)
#   $QVL_INTEROP_DIR/lf     llamafactory==0.9.5
# Both reuse the project venv's torch/torchvision (and their CUDA wheels): a .pth file puts a folder of
# symlinks to them on sys.path, so pip sees torch==2.14.1 installed and downloads no second torch; a
# constraints file keeps pip from replacing it. Idempotent: an env whose stamp matches is kept; pip's
# cache lives in $QVL_INTEROP_DIR/pip-cache (cache that folder in CI).
#   QVL_INTEROP_DIR  where the envs go (default: .interop/ in the repository, git-ignored)
#   QVL_PYTHON       the project's python, whose torch is reused (default: .venv/bin/python, else python3)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${QVL_INTEROP_DIR:-$ROOT/.interop}
if [ -z "${QVL_PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then QVL_PYTHON=$ROOT/.venv/bin/python; else QVL_PYTHON=python3; fi
fi
SWIFT_SPEC=(ms-swift==4.6.0 qwen-vl-utils==0.0.14 decord==0.6.0)
LF_SPEC=(llamafactory==0.9.5)

# the project's site-packages, base interpreter, torch and torchvision versions (metadata only: no import)
read -r SITE BASE TORCH VISION < <("$QVL_PYTHON" -c '
import sys, importlib.metadata as m, importlib.util as u, os
site = os.path.dirname(os.path.dirname(u.find_spec("torch").origin))
print(site, getattr(sys, "_base_executable", sys.executable), *(m.version(p).split("+")[0] for p in ("torch", "torchvision")))')
mkdir -p "$CACHE/torch-site"
export PIP_CACHE_DIR=$CACHE/pip-cache PIP_DISABLE_PIP_VERSION_CHECK=1

# torch, torchvision and the wheels torch's CUDA build requires (nvidia-*, cuda-*, triton): symlinks
find "$CACHE/torch-site" -mindepth 1 -maxdepth 1 -type l -delete
shopt -s nullglob
for entry in "$SITE"/{torch,torchvision,torchgen,functorch,triton,nvidia,cuda}{,-*.dist-info,_*.dist-info,.libs} \
             "$SITE"/{nvidia_,cuda_}*.dist-info; do
  [ -e "$entry" ] && ln -sfn "$entry" "$CACHE/torch-site/$(basename "$entry")"
done
shopt -u nullglob
printf 'torch==%s\ntorchvision==%s\n' "$TORCH" "$VISION" > "$CACHE/constraints.txt"

make_env() {  # name, packages...
  local name=$1; shift
  local env=$CACHE/$name stamp="$* torch==$TORCH site=$SITE"
  if [ -f "$env/.qvl-stamp" ] && [ "$(cat "$env/.qvl-stamp")" = "$stamp" ]; then
    # the .pth names this cache's torch-site: rewritten, so that a cache moved or copied still finds torch
    "$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' | \
      { read -r envsite; echo "$CACHE/torch-site" > "$envsite/qvl-project-torch.pth"; }
    "$env/bin/python" -c 'import torch' && { echo "$name: up to date ($env)"; return; }
  fi
  local start=$SECONDS
  rm -rf "$env"
  "$BASE" -m venv "$env"
  local envsite
  envsite=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$CACHE/torch-site" > "$envsite/qvl-project-torch.pth"
  "$env/bin/python" -m pip install --quiet -c "$CACHE/constraints.txt" "$@"
  "$env/bin/python" -c 'import torch, torchvision; assert torch.__version__.startswith("'"$TORCH"'"), torch.__file__'
  echo "$stamp" > "$env/.qvl-stamp"
  echo "$name: installed $* in $((SECONDS - start)) s ($env)"
}

make_env swift "${SWIFT_SPEC[@]}"
make_env lf "${LF_SPEC[@]}"
