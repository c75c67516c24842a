"""crowdseg: crowd instance segmentation and counting from point labels."""
__version__ = "0.1.0"
