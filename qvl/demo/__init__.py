"""The bundled demo: a deterministic synthetic world and the pipeline run on it."""
