"""seqmarl: cooperative multi-agent RL as sequence modelling (Multi-Agent Transformer)."""

__version__ = "0.1.0"
