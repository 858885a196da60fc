"""megatron_glm: GLM pretraining with Megatron-style tensor/pipeline parallelism on DeepSpeed."""

__version__ = "0.1.0"
