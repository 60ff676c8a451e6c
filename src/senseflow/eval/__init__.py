"""Evaluation: prompt sets, metric runs and result records."""
