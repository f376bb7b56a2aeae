"""Training: stage-aware trainable sets, the optimizer, sharded train state and the jitted train step."""
