"""What a trained model has learned: held-out blank accuracy against baselines, and loss-curve pictures."""
