"""Parallelism applied to a built model from outside: layouts, groups, sharded layers."""
