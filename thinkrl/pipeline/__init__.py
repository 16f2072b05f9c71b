"""Multi-stage recipes (DeepSeek-R1, Kimi k1.5 long2short) built from SFT, RL, rejection
sampling, DPO and weight merging; see ``thinkrl.pipeline.run``."""
