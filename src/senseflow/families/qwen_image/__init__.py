"""Qwen-Image (``QwenImagePipeline`` folders): the adapter and its tiny test folders."""
