"""Training and evaluation loops used by tools/train.py and tools/eval.py."""
