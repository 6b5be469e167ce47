"""Streaming, architecture-agnostic checkpoint merging (task vectors, TIES, DARE, TSV, RCP, AIM, ...)."""
