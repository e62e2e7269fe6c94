"""The demo model ``demo-shapes``: a generator of labelled pictures and its trainer."""
