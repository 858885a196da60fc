"""What a trained model has learned: held-out blank accuracy against baselines and loss-curve pictures (the
demo), zero-shot last-word accuracy and windowed perplexity (glm-eval), ROUGE of generated texts (seq2seq
finetuning)."""
