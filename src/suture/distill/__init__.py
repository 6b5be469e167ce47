"""Staged distillation of hybrids from their source transformer: not implemented yet (the next stage)."""
