"""The bundled trainer: a Qwen-VL-style model and its three training stages."""
