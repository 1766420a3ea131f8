"""Integrations with training libraries (imported on demand: each needs its optional extra)."""
