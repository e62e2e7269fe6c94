"""The in-container wanwu worker: loads a model bundle and answers images with it
(classify or embed).

It runs in three modes (see ``python -m wanwu_worker --help``):

- ``serve``: the warm mode the scheduler drives: HTTP on a Unix socket, or on TCP
  (``--listen HOST:PORT``) where every request must carry the worker's secret
  (``--secret-file``); with ``--stem``, a stem cell that loads its model when told
  (``server``, ``handler``);
- ``predict FILE...``: one-shot, prints one JSON line per file;
- ``check``: loads the bundle's model as ``serve`` would, answers an image and prints
  one JSON line of measurements.
"""

import warnings

# Both images ship NumPy (onnxruntime requires it, and ONNX bundles are fed through it),
# so torch finds it there; torch itself does not require NumPy, and where it is missing
# torch warns at import, which would only be noise in every worker's log.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
# TorchScript (model.pt) is one of three bundle formats, beside torch.export (model.pt2)
# and ONNX (README.md, "Model bundles"); torch 2.13 calls torch.jit deprecated in favour
# of torch.export, a warning that would be noise each time a TorchScript bundle loads.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)

__version__ = "0.1.0"
