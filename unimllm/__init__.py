"""unimllm core: config, distributed set-up, checkpointing, logging and the one trainer loop.

No model code lives here: models are in ``tokenizer`` and ``llm``, data in ``data``, evaluation in
``eval``. Those packages import from ``unimllm``; ``unimllm`` never imports them, except the ``unimllm``
command line (``cli.py`` with ``artifacts.py`` and ``consolidate.py``), which imports them lazily, inside
its commands.
"""

__version__ = "0.1.0"
