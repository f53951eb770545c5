"""The three transformer families, built from one ModelConfig."""

from lmforge.config import ModelConfig
from lmforge.models.base import TransformerModel
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import EncoderModel
from lmforge.models.encoder_decoder import EncoderDecoderLM

FAMILY_CLASSES = {"decoder": DecoderLM, "encoder": EncoderModel, "encoder-decoder": EncoderDecoderLM}


def build_model(config: ModelConfig) -> TransformerModel:
    """A freshly initialised model of the config's architecture."""
    return FAMILY_CLASSES[config.arch](config)


__all__ = ["build_model", "DecoderLM", "EncoderModel", "EncoderDecoderLM", "TransformerModel", "FAMILY_CLASSES"]
