"""What the readers share, none of it a format (the registry never imports this package as a family).

- :mod:`.reader`: the readers' shared steps: grouping keys by module and part, detection by ``peft_type`` or key
  pattern, refused config switches, invalid layers, building the :class:`~rankscope.core.checkpoint.Checkpoint`;
- :mod:`.source`: finding an adapter's files (a PEFT directory, a multi-adapter directory, a bare tensor file);
- :mod:`.peft`: PEFT's config rules (``rank_pattern``/``alpha_pattern``, α/r, diffusers' per-component configs);
- :mod:`.kohya_scale`, :mod:`.diffusers`, :mod:`.lora_init`, :mod:`.lora_layout`, :mod:`.lora_mha`: the LoRA
  readers' α rules, diffusers' key aliases, base-rewriting inits, Conv1D/Linear orientation, MultiheadAttention;
- :mod:`.lycoris_math`, :mod:`.lycoris_dense`, :mod:`.lycoris_peft`: LoHa/LoKr/full/GLoRA/DoRA maths and the
  PEFT LoHa/LoKr reading loop.
"""
