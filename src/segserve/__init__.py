"""segserve: the segmentation pipeline behind the TorchServe handler.

Importable and testable without TorchServe: config, decode, transforms, model
building, encoders and typed errors live here; handler/segmenter_handler.py is
thin glue around `segserve.pipeline.Segmenter`.
"""

__version__ = "0.1.0"
