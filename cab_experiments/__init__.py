"""The experiments behind experiments/RESULTS.md and experiments/CALIBRATION.md (``python -m cab_experiments``; not part of ``cab_vllm``).

    cab_experiments.cli        the ``python -m cab_experiments`` command: niah, ppl, ablation, bridge, plot
    cab_experiments.calibrate  block-level calibration on captured Q/K (``python -m cab_experiments.calibrate``)

Needs the ``eval`` extra (transformers, gguf, matplotlib, ...); models and text come from ``cab_models``.
"""
