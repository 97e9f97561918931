"""retain: continual learning for large language models.

Train a stream of tasks on a pretrained LLM, measure what it forgot (accuracy matrix,
AA, BWT, FWT, FM, a general-ability probe) and hand over adapters a server can load.
"""

from retain.errors import RetainError

__version__ = "0.1.0"
__all__ = ["RetainError", "__version__"]
