#!/usr/bin/env bash
# make demo: the main job end to end on the bundled Austen corpus, on this machine's CPUs (or GPUs), in a
# few minutes, ending with evidence that the model learned.
#   1. glm-train-tokenizer  a 4,000-token BPE on the corpus (the config uses the bundled identical copy)
#   2. glm-preprocess       the corpus -> Megatron .bin/.idx, one sequence per sentence
#   3. sample directory     packed samples with precomputed span masks (glm-pretrain --prepare-only)
#   4. glm-pretrain         glm-demo on 2 ranks with DeepSpeed (ZeRO-1, fp32), evaluation per objective
#   5. glm-eval-blanks      top-1 accuracy on held-out blanks: unigram baseline, untrained, trained
#   6. glm-fill-blanks      the trained model fills [MASK] blanks (greedy)
#   7. glm-plot-losses      the loss curves as a PNG beside metrics.jsonl
# Set DEMO_STEPS / DEMO_RANKS to change the training length and the number of ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=outputs/demo
CONFIG=run/configs/glm-demo.yaml
STEPS=${DEMO_STEPS:-4000}
RANKS=${DEMO_RANKS:-2}
START=$SECONDS
banner() { printf '\n==== %s (%ds) ====\n' "$*" $((SECONDS - START)); }

banner "1/7 train a tokenizer on the corpus ($(du -h run/demo/corpus/austen-chapters.jsonl | cut -f1), Jane Austen's six novels)"
glm-train-tokenizer --input run/demo/corpus/austen-chapters.jsonl --vocab-size 4000 \
    --output "$OUT/tokenizer.json" --no-progress
if cmp -s "$OUT/tokenizer.json" run/demo/tokenizer.json; then
    echo "identical to run/demo/tokenizer.json, the bundled copy that $CONFIG names"
else
    echo "note: differs from the bundled run/demo/tokenizer.json (another tokenizers version?); the demo uses the bundled one"
fi

banner "2/7 preprocess the corpus"
glm-preprocess --input run/demo/corpus/austen-chapters.jsonl --output-prefix "$OUT/corpus/austen" \
    --tokenizer run/demo/tokenizer.json --workers 2
glm-inspect "$OUT/corpus/austen"

banner "3/7 samples with precomputed span masks (token 80% / sentence 10% / document 10%)"
SAMPLES=$(glm-pretrain --config "$CONFIG" --prepare-only)
glm-inspect "$SAMPLES"
glm-inspect "$SAMPLES" --show 1

banner "4/7 pretrain glm-demo for $STEPS steps on $RANKS ranks (DeepSpeed ZeRO-1, fp32)"
rm -rf "$OUT/checkpoints" "$OUT/logs"
torchrun --nproc_per_node "$RANKS" -m megatron_glm.cli.pretrain --config "$CONFIG" \
    --set training.train_steps="$STEPS"

banner "5/7 did it learn? held-out blank accuracy"
glm-eval-blanks --config "$CONFIG" --checkpoint "$OUT/checkpoints"

banner "6/7 the trained model fills the blanks (greedy)"
glm-fill-blanks --config "$CONFIG" --checkpoint "$OUT/checkpoints" --max-tokens 1 \
    --text "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a [MASK]." \
    --text "\"I do not [MASK] what you mean,\" said Elizabeth." \
    --text "She was very [MASK] to see him." \
    --text "He had been [MASK] in love with her."

banner "7/7 loss curves"
glm-plot-losses "$OUT/logs/metrics.jsonl"
echo
echo "metrics: $OUT/logs/metrics.jsonl   tensorboard: tensorboard --logdir $OUT/logs/tensorboard"
echo "demo done in $((SECONDS - START))s"
