"""Helpers for tests that run real multi-process jobs under torchrun (gloo, CPU)."""
