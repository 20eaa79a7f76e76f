"""Fidelity of sparse prefill: the layer probe, teacher-forced scoring, and synthetic tasks."""
