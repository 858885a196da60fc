"""Finetuning a GLM checkpoint on the pretraining engine (``glm-finetune``).

common    the engine, batches, epoch loop and best weights every task shares (``finetune``)
cloze     PET-style classification: pattern + verbalizer, candidates scored at the mask, dev accuracy
seq2seq   source -> target generated at a [gMASK]/[MASK] blank, label smoothing, dev ROUGE of beam search
"""

from megatron_glm.finetune.cloze import ClozeExample, ClozeTask, cloze_accuracy, cloze_example, finetune_cloze
from megatron_glm.finetune.common import FinetuneResult, finetune
from megatron_glm.finetune.seq2seq import (
    MASKS,
    Seq2SeqExample,
    finetune_seq2seq,
    seq2seq_example,
    seq2seq_predictions,
    seq2seq_rouge,
)

__all__ = [
    "MASKS",
    "ClozeExample",
    "ClozeTask",
    "FinetuneResult",
    "Seq2SeqExample",
    "cloze_accuracy",
    "cloze_example",
    "finetune",
    "finetune_cloze",
    "finetune_seq2seq",
    "seq2seq_example",
    "seq2seq_predictions",
    "seq2seq_rouge",
]
