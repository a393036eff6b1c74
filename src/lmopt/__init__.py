"""lmopt: which optimizer trains my transformer language model fastest, and by how much?"""

__version__ = "0.1.0"
