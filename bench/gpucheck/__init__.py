"""bench/gpu_check.py's sections, one module each (a to e), and what they share (common)."""
