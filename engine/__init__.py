"""pawcam engine: decoding, the model, Grad-CAM, pictures, the results CSV, bulk runs.

The base package: it imports neither ``watcher`` nor ``training``; both build on it.
"""
__version__ = "0.1.0"
