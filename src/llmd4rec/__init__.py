"""LLMD4Rec: bidirectional distillation between LLM-centric and conventional sequential recommenders."""

__version__ = "0.1.0"
