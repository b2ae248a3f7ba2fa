"""tunelab: fine-tune and align language models (SFT, reward modeling, DPO, RLHF with PPO)."""

__version__ = "0.1.0"
