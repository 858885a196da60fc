#!/usr/bin/env bash
# make demo: the main job end to end on the bundled Austen corpus, on this machine's CPUs (or GPUs).
#   1. glm-preprocess   the corpus -> Megatron .bin/.idx, one sequence per sentence
#   2. glm-inspect      corpus statistics
#   3. sample directory packed samples with precomputed span masks (glm-pretrain --prepare-only)
#   4. glm-pretrain     glm-tiny on 2 ranks with DeepSpeed (ZeRO-1, fp32), checkpoints and evaluation
#   5. glm-fill-blanks  the trained model fills [MASK] blanks (greedy)
# Set DEMO_STEPS / DEMO_RANKS to change the training length and the number of ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=outputs/demo
CONFIG=run/configs/glm-tiny.yaml
STEPS=${DEMO_STEPS:-250}
RANKS=${DEMO_RANKS:-2}
banner() { printf '\n==== %s ====\n' "$*"; }

banner "1/5 preprocess the bundled corpus ($(du -h run/demo/corpus/austen-chapters.jsonl | cut -f1), Jane Austen's six novels)"
glm-preprocess --input run/demo/corpus/austen-chapters.jsonl --output-prefix "$OUT/corpus/austen" \
    --tokenizer bert-base-uncased --workers 2

banner "2/5 corpus statistics"
glm-inspect "$OUT/corpus/austen"

banner "3/5 samples with precomputed span masks (token 70% / sentence 10% / document 20%)"
SAMPLES=$(glm-pretrain --config "$CONFIG" --prepare-only)
glm-inspect "$SAMPLES"
glm-inspect "$SAMPLES" --show 2

banner "4/5 pretrain glm-tiny for $STEPS steps on $RANKS ranks (DeepSpeed ZeRO-1, fp32)"
rm -rf "$OUT/checkpoints" "$OUT/logs"
torchrun --nproc_per_node "$RANKS" -m megatron_glm.cli.pretrain --config "$CONFIG" \
    --set training.train_steps="$STEPS"

banner "5/5 the trained model fills the blanks (greedy)"
glm-fill-blanks --config "$CONFIG" --checkpoint "$OUT/checkpoints" --max-tokens 4 \
    --text "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a [MASK]." \
    --text "\"I do not [MASK] what you mean,\" said Elizabeth." \
    --text "Mr. and Mrs. [MASK] were at home."
echo
echo "metrics: $OUT/logs/metrics.jsonl   tensorboard: tensorboard --logdir $OUT/logs/tensorboard"
