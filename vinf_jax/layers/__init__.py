"""Building blocks of the UNet: attention, normalisation, embeddings, ResBlocks, transformers."""
