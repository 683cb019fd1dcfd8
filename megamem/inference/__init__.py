"""Using a trained model: load it from what a run wrote, evaluate it."""
