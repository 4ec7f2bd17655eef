"""`qvl eval`: a checkpoint scored the way the Qwen-VL paper scored the released models."""
