"""MixMIM reproduction and benchmark suite."""
