#!/usr/bin/env bash
# Download the wheels a GPU machine without a package index needs on top of its own PyTorch, at the versions of
# this checkout's .venv, for that machine's Python (default 3.12), into two folders: core (the packages and their
# loaders) and app (gradio and its server). There, install each with
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
# and run `python3 -m benchmarks.gpu`. Two folders because some machines take a limited upload at a time.
#   bash scripts/offline_wheels.sh [PYTHON_VERSION] [CORE_DIR] [APP_DIR]     (defaults: 3.12 .whl .whlapp)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}" core="${2:-.whl}" app="${3:-.whlapp}"
[ -x .venv/bin/python ] || { echo "offline_wheels: run scripts/setup.sh dev first (the versions come from .venv)" >&2; exit 1; }
freeze="$(.venv/bin/python -m pip list --format=freeze --disable-pip-version-check)"
pins() {  # NAME==VERSION of each name as installed in .venv (pip's spelling, case and -/_ ignored)
  for name in "$@"; do
    pin="$(grep -i -E "^${name//[-_]/[-_]}==" <<<"$freeze" || true)"
    [ -n "$pin" ] || { echo "offline_wheels: $name is not installed in .venv" >&2; exit 1; }
    echo "$pin"
  done
}
fetch() {
  local dir="$1"
  shift
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" $(pins "$@")
}
# diffusers' and transformers' own needs at the versions they check at import; the machine's other packages stay
fetch "$core" diffusers transformers tokenizers huggingface_hub hf-xet safetensors kernels kornia kornia_rs \
  torchattacks regex click typer httpx2 httpcore2 truststore idna anyio h11 filelock importlib_metadata tomlkit
fetch "$app" gradio gradio_client hf-gradio fastapi starlette uvicorn pydantic pydantic_core annotated-types \
  typing-inspection typing_extensions opentelemetry-api orjson python-multipart safehttpx semantic-version \
  groovy pydub brotli pytz
du -sh "$core" "$app"
