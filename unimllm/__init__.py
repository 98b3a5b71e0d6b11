"""unimllm core: config, distributed set-up, checkpointing, files, logging and the one trainer loop.

No model code lives here: models are in ``tokenizer`` and ``llm``, data in ``data``, benchmarks and metrics in
``eval``; they import from the core and never from each other (``eval`` may read ``data``). The composition
layer ``unimllm.stages`` (stage tasks, pipeline, CLI, artifacts, evaluation runner) sits on top of all of
them. The core imports none of them (``tests/test_layers.py``).
"""

__version__ = "0.1.0"
