"""Corpus preprocessing into token shards, tokenizers, and the training data loader."""
