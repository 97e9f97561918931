"""Load a base model and its tokenizer from any of the specs a config's ``model:`` accepts."""

from retain.models.loader import EMBEDDED, TINY, describe_models, load_model, resolve_model_spec

__all__ = ["EMBEDDED", "TINY", "describe_models", "load_model", "resolve_model_spec"]
