"""The demo model ``demo-shapes``: a generator of labelled pictures, its trainer, and its
re-export as a torch.export program or ONNX (``export``)."""
