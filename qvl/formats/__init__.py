"""Annotations and conversations -> tokenized training sequences with loss masks."""
