"""Everything that knows a checkpoint layout, used by glm-pretrain, glm-fill-blanks and glm-convert.

files        file names, tracker files, atomic writes, the safe loader for files of unknown origin
layout       THUDM keys, tensor-parallel split/merge (interleaved QKV), pipeline stage names, vocab padding
thudm        THUDM-layout weights: load at any tensor-parallel size, the one writer
safetensors  streaming (sharded) safetensors writer
hf           Hugging Face export/import (with self-contained remote code in hf_remote_code/)
convert      the conversions behind glm-convert
"""

from megatron_glm.checkpoint.files import (
    CONFIG_FILE,
    META_FILE,
    PARTIAL_SUFFIX,
    TRACKER_FILES,
    WEIGHTS_SUBDIR,
    CheckpointError,
    find_checkpoint_files,
    load_torch_file,
    rng_file_name,
    shard_file_name,
    staged,
    tile_file_name,
    write_text_atomic,
    write_trackers,
)
from megatron_glm.checkpoint.layout import (
    WORD_EMBEDDINGS,
    ModelShape,
    Partition,
    expected_keys,
    full_shape,
    merge_shards,
    model_shape,
    partition_of,
    pipeline_key_to_thudm,
    split_tensor,
)
from megatron_glm.checkpoint.thudm import (
    ThudmShards,
    load_thudm_checkpoint,
    read_module_state,
    save_thudm_checkpoint,
    write_module_file,
    write_training_weights,
)

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "PARTIAL_SUFFIX",
    "TRACKER_FILES",
    "WEIGHTS_SUBDIR",
    "WORD_EMBEDDINGS",
    "CheckpointError",
    "ModelShape",
    "Partition",
    "ThudmShards",
    "expected_keys",
    "find_checkpoint_files",
    "full_shape",
    "load_thudm_checkpoint",
    "load_torch_file",
    "merge_shards",
    "model_shape",
    "partition_of",
    "pipeline_key_to_thudm",
    "read_module_state",
    "rng_file_name",
    "tile_file_name",
    "save_thudm_checkpoint",
    "shard_file_name",
    "split_tensor",
    "staged",
    "write_module_file",
    "write_text_atomic",
    "write_trackers",
    "write_training_weights",
]
