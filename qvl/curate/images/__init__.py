"""The kept pairs' images: download (img2dataset in its own process), address and pixel checks, CLIP scores."""
