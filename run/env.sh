# Sourced by the Makefile and launch scripts: the environment for this machine, chosen by what is present.
# On machines without a CUDA GPU, DeepSpeed uses its CPU accelerator (gloo) and Triton its interpreter.
VENV_BIN="$(cd "$(dirname "${BASH_SOURCE:-$0}")/.." && pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
fi
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-true}"
