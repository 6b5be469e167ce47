"""Staged distillation of hybrids from their source transformer (M1, Apriel-H1 and MambaInLlama recipes)."""
