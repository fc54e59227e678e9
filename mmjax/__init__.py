"""mmjax: JAX/Flax building blocks and a research harness for multimodal models.

Importing mmjax touches no device, parses no flag and reads no file.
"""

__version__ = "0.1.0"  # The one place: pyproject.toml reads it.
