# Sourced by the Makefile and launch scripts: the environment for this machine, chosen by what is present.
# On machines without a CUDA GPU, DeepSpeed uses its CPU accelerator (gloo) and Triton its interpreter.
VENV_BIN="$(cd "$(dirname "${BASH_SOURCE:-$0}")/.." && pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"
# Decided by what torch sees (a GPU container may have no nvidia-smi): DeepSpeed's accelerator, Triton and
# our device choice must agree. GLM_PYTHON names another interpreter (a GPU image's own python3).
GLM_PYTHON="${GLM_PYTHON:-$VENV_BIN/python}"
[ -x "$GLM_PYTHON" ] || GLM_PYTHON=python3
if ! "$GLM_PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
fi
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-true}"
