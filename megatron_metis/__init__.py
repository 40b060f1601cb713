"""megatron_metis: Metis-RISE (RL incentivizes, SFT enhances) on Megatron-Core.

Layers, lowest first (imports only point down this list; ``a | b`` never import each other)::

    config -> data | rewards | kernels -> parallel -> models -> checkpoint
           -> rollout | algorithms -> trainer -> stages -> cli
"""

__version__ = "0.1.0"
