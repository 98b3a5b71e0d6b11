"""EvoTok residual-VQ image tokenizer (stage 1): encoder, residual quantiser, pixel and semantic decoders."""
