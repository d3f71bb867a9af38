"""Accuracy: perplexity, zero-shot tasks, agreement with the unquantized model."""
