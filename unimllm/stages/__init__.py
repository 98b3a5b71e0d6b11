"""The composition layer: where the core, the models, the data and the benchmarks are put together.

Stage tasks plug into the core's one trainer loop: ``teacher_stage`` (the shapes world's semantic teacher),
``tokenizer_stage`` (stage 1), ``alignment_stage`` with ``alignment_config`` and ``samples`` (stage 2),
``instruct_stage`` (stage 3). Built on trained stages: ``precompute_codes`` (codes for stage 2),
``pipeline`` (understanding replies and image generation), ``reconstruction``, ``evaluation`` (the benchmark
runner), ``artifacts`` (what a path holds, tokenizer identity), ``consolidate`` (checkpoint -> export),
``cli`` (the ``unimllm`` command), ``lmms_adapter`` and ``cell_probe``.

Nothing below this package imports it (``tests/test_layers.py``); ``launch/`` entry points import it.
"""
