"""Training: config and recipes, the trainer loop, checkpoints, the guard, run directories."""
