"""pairsieve: streaming selection of unaligned multimodal items worth aligning."""

__version__ = "0.1.0"
