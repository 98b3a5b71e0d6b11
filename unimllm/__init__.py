"""unimllm core: config, distributed set-up, checkpointing, logging and the one trainer loop.

No model code lives here: models are in ``tokenizer`` and ``llm``, data in ``data``, evaluation in
``eval``. Those packages import from ``unimllm``; ``unimllm`` never imports them.
"""

__version__ = "0.1.0"
