"""The unified multimodal LLM (stages 2-3): HF causal LM + understanding projector + depth-transformer head."""
