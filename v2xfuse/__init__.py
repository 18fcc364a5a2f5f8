"""v2xfuse: cooperative V2X perception — encoders, fusion methods, messages as bytes, evaluation."""
__version__ = "0.1.0"
