"""Fixtures for the tests, benchmarks and examples of a checkout of the repository; not installed.

* ``vmonarch_fixtures.models`` — small diffusers video transformers with random weights, each factory
  returning ``(model, batch)`` (``vmonarch-opt calibrate vmonarch_fixtures.models:wan`` from the
  repository root);
* ``vmonarch_fixtures.tiny_dit`` — a tiny video DiT with trained weights
  (``tiny_video_dit.safetensors``, next to this file).

The tests find this package through pytest's ``pythonpath``; the scripts in ``benchmarks/`` and
``examples/`` put the repository root on ``sys.path`` themselves.
"""
