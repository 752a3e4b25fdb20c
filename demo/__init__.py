"""The paper's experiment in miniature and on SmolLM2: scripts (python demo/run.py), importable as
demo.*."""
