"""Evaluation: metrics and the evaluation loop."""
