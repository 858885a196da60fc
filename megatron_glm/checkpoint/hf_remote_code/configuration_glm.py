"""GLM configuration for Hugging Face ``transformers`` (remote code written by megatron-glm's glm-convert).

Field names follow THUDM/GLM's released ``configuration_glm.py``; ``max_sequence_length`` is the position
table size minus one (the tables have one extra row).
"""

from transformers import PretrainedConfig


class GLMConfig(PretrainedConfig):
    model_type = "glm"
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(
        self,
        num_layers=24,
        vocab_size=30592,
        hidden_size=1024,
        num_attention_heads=16,
        embedding_dropout_prob=0.1,
        attention_dropout_prob=0.1,
        output_dropout_prob=0.1,
        max_sequence_length=512,
        block_position_encoding=True,
        attention_scale=1.0,
        initializer_range=0.02,
        layernorm_epsilon=1e-5,
        output_predict=True,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.embedding_dropout_prob = embedding_dropout_prob
        self.attention_dropout_prob = attention_dropout_prob
        self.output_dropout_prob = output_dropout_prob
        self.max_sequence_length = max_sequence_length
        self.block_position_encoding = block_position_encoding
        self.attention_scale = attention_scale
        self.initializer_range = initializer_range
        self.layernorm_epsilon = layernorm_epsilon
        self.output_predict = output_predict
        super().__init__(**kwargs)
