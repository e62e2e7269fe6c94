"""The in-container wanwu worker: loads one model bundle and classifies images.

It runs in two modes (see ``python -m wanwu_worker --help``):

- ``serve``: HTTP on a Unix socket, the warm mode the scheduler drives;
- ``predict FILE...``: one-shot, prints one JSON line per file.
"""

import warnings

# The CPU image ships without NumPy on purpose (Pillow and torch talk through bytes);
# torch warns about that at import, which would only be noise in every worker's log.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
# Bundles are TorchScript by design (DESIGN.md, "Model bundle"); torch 2.13 calls
# torch.jit deprecated in favour of torch.export, which would be a new bundle format.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)

__version__ = "0.1.0"
