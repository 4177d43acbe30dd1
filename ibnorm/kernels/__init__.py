"""Fused kernels for IBNorm.  They know nothing of models; ``dispatch`` picks a path."""
